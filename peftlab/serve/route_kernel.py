"""The expand of routed (MoLoRA) tables in the fixed-shape step, with the routing in it: one Triton launch after the
row kernels' shrink (``kernels.row_shrink`` of each table's experts' A and router) for up to ``kernels.MAX_GROUP``
tables that read one input (q / k / v, gate / up). Each program takes one token, a tile of one table's outputs: it
sums the shrink's partial sums into the token's rank activations and router logits, chooses the top-k experts and
their softmax gates, and adds ``B[:, chosen experts] @ (gated rank activations)`` into the output, reading B's columns
of the chosen experts only (an unchosen expert's gate is zero). In torch the routing alone (``mixture_gates``: a sort,
masks, a softmax, a scatter, then the product) is about fifteen small kernels per adapted linear, and a
graph-replayed decode step is bound by its count of small kernels. Rounding as the torch form: logits, rank
activations, gates and their product each in the output's dtype; ties choose the lower expert index (a stable sort's
order)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_gated(zp, ts, mine, stride_zg, stride_zt, stride_zc, C, E, R, k, n, dt, BLOCK_T: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """(mid, chosen) of the tile's tokens ``ts`` of one row (``mine``; the others' mid is zero): mid (BLOCK_T, BLOCK_E,
    BLOCK_R) fp32 their gated rank activations z[e R + r] gate[e], chosen (BLOCK_T, BLOCK_E) each token's top-``k``
    of the row's ``n`` experts; with k 0 (a slot without a routed adapter here) the gates are zero. The gating maths of
    both route-expand kernels (this file's one token at a time through ``_gated``, ``lane_expands``' by tiles)."""
    es, rs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_R)
    e_ok = es < E
    cell = es[:, None] * R + rs[None, :]
    cell_ok = mine[:, None, None] & (e_ok[:, None] & (rs < R)[None, :])[None, :, :]
    z = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_R), tl.float32)
    logits = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for c in range(C):
        at = zp + ts * stride_zt + c * stride_zc
        z += tl.load(at[:, None, None] + cell[None, :, :], mask=cell_ok, other=0.0)
        logits += tl.load(at[:, None] + stride_zg + es[None, :], mask=mine[:, None] & e_ok[None, :], other=0.0)
    valid = (es < tl.maximum(n, 1))[None, :]
    logits = tl.where(valid, logits.to(dt).to(tl.float32), float("-inf"))
    li, lj = logits[:, :, None], logits[:, None, :]
    ahead = (lj > li) | ((lj == li) & (es[None, None, :] < es[None, :, None]))  # experts ranked before each one
    chosen = valid & (tl.sum(ahead.to(tl.int32), axis=2) < tl.maximum(k, 1))
    top = tl.max(tl.where(chosen, logits, float("-inf")), axis=1)
    w = tl.where(chosen, tl.exp(logits - top[:, None]), 0.0)
    gates = tl.where(k > 0, w / tl.sum(w, axis=1)[:, None], 0.0).to(dt).to(tl.float32)
    mid = (z.to(dt).to(tl.float32) * gates[:, :, None]).to(dt).to(tl.float32)
    return mid, chosen & mine[:, None]


@triton.jit
def _gated(zp, stride_zg, stride_zc, C, E, R, k, n, dt, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """(mid, chosen) of one token: mid (BLOCK_E, BLOCK_R), chosen (BLOCK_E,), ``_tile_gated`` over a tile of that
    token alone (its partial sums at ``zp``)."""
    one = tl.arange(0, 1)
    mid, chosen = _tile_gated(zp, one, one == 0, stride_zg, 0, stride_zc, C, E, R, k, n, dt, 1, BLOCK_E, BLOCK_R)
    return tl.sum(mid, axis=0), tl.sum(chosen.to(tl.int32), axis=0) > 0


@triton.jit
def _route_expand_kernel(zp_ptr, b_ptrs, rows_ptr, out_ptrs, k_ptrs, n_ptrs, Ns, Es, Rs, C, skip_row, stride_zg,
                         stride_zt, stride_zc, stride_bs, stride_bn, stride_ot, stride_k, stride_n, G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """out_g[t, ns] += B_g[row(t), ns] @ mid_g[t] for one token, BLOCK_N outputs and one of the G tables per program
    (table g's z and logits at zp[2 g] and zp[2 g + 1]); nothing for ``skip_row``."""
    t, g = tl.program_id(0), tl.program_id(2)
    row = tl.load(rows_ptr + t).to(tl.int64)
    if row != skip_row:
        for i in tl.static_range(G):  # the tables are separate tensors: a branch per table, one runs
            if g == i:
                out_ptr = out_ptrs[i]
                k = tl.load(k_ptrs[i] + row * stride_k[i]).to(tl.float32).to(tl.int32)
                n = tl.load(n_ptrs[i] + row * stride_n[i]).to(tl.float32).to(tl.int32)
                mid, chosen = _gated(zp_ptr + 2 * i * stride_zg + t * stride_zt, stride_zg, stride_zc, C, Es[i], Rs[i],
                                     k, n, out_ptr.dtype.element_ty, BLOCK_E, BLOCK_R)
                ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = ns < Ns[i]
                es, rs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_R)
                cell = es[:, None] * Rs[i] + rs[None, :]
                # B's columns of the chosen experts only (none with k 0)
                read = (chosen & (es < k * BLOCK_E))[:, None] & (rs < Rs[i])[None, :]
                b = tl.load(b_ptrs[i] + row * stride_bs[i] + ns[:, None, None] * stride_bn[i] + cell[None, :, :],
                            mask=n_ok[:, None, None] & read[None, :, :], other=0.0).to(tl.float32)
                acc = tl.sum(tl.sum(b * mid[None, :, :], axis=2), axis=1)
                ptrs = out_ptr + t * stride_ot[i] + ns
                y = tl.load(ptrs, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(ptrs, (y + acc).to(out_ptr.dtype.element_ty), mask=n_ok)


def route_expand(zp: torch.Tensor, tables: list[tuple], rows: torch.Tensor, skip_row: int = -1,
                 lanes: bool = False) -> None:
    """``out[t] += up[i] @ (z[t] ⊙ gates[t])`` (i = rows[t]) for each of ``tables``, given as (up (S+1, N, E R) with
    the experts' blocks of R columns in order, out (T, N), top_k (S+1, 1), experts (S+1, 1) (small integers in any
    dtype), E, R); ``zp`` (2 G, T, C, >= E R) fp32 ``row_shrink``'s partial sums of [A_0, router_0, A_1, ...] (A (S+1,
    E R, in), router (S+1, E, in)). Tokens of ``skip_row`` untouched. ``lanes``: ``lane_expands.lane_route_expand``."""
    if zp.shape[0] != 2 * len(tables):
        raise ValueError(f"route_expand: {len(tables)} tables need 2 x {len(tables)} partial sums, got {zp.shape[0]}")
    for up, out, top_k, experts, e, r in tables:
        if up.shape[2] != e * r or out.shape != (zp.shape[1], up.shape[1]) or up.stride(2) != 1 or out.stride(1) != 1:
            raise ValueError(f"route_expand: up {tuple(up.shape)}, out {tuple(out.shape)} do not fit {e} experts of rank "
                             f"{r} and {zp.shape[1]} tokens (row-major)")
    t = zp.shape[1]
    if t == 0:
        return
    args = route_args(zp, tables, rows, skip_row)
    if lanes:
        from peftlab.serve.lane_expands import lane_route_expand

        lane_route_expand(args, tables, t)
        return
    block_e, block_r = triton.next_power_of_2(max(args["Es"])), triton.next_power_of_2(max(args["Rs"]))
    block_n = max(16, min(128, 4096 // (block_e * block_r)))  # a (BLOCK_N, E, R) tile of B per program
    _route_expand_kernel[(t, triton.cdiv(max(args["Ns"]), block_n), len(tables))](
        **args, BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_R=block_r)


def route_args(zp: torch.Tensor, tables: list[tuple], rows: torch.Tensor, skip_row: int) -> dict:
    """The keyword arguments the route-expand kernels share (``route_expand``'s tables, checked there)."""
    ups, outs, ks, ns, es, rs = zip(*tables)
    return dict(zp_ptr=zp, b_ptrs=ups, rows_ptr=rows, out_ptrs=outs, k_ptrs=ks, n_ptrs=ns,
                Ns=tuple(u.shape[1] for u in ups), Es=es, Rs=rs, C=zp.shape[2], skip_row=skip_row,
                stride_zg=zp.stride(0), stride_zt=zp.stride(1), stride_zc=zp.stride(2),
                stride_bs=tuple(u.stride(0) for u in ups), stride_bn=tuple(u.stride(1) for u in ups),
                stride_ot=tuple(o.stride(0) for o in outs), stride_k=tuple(v.stride(0) for v in ks),
                stride_n=tuple(v.stride(0) for v in ns), G=len(tables))
