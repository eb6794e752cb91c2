"""The expand of routed (MoLoRA) tables in the fixed-shape step, with the routing in it: one Triton launch after the
row kernels' shrink (``kernels.row_shrink`` of each table's experts' A and router) for up to ``kernels.MAX_GROUP``
tables that read one input (q / k / v, gate / up). Each program takes a tile of 16 tokens and of one table's
outputs: it sums the shrink's partial sums into each token's rank activations and router logits, chooses its top-k
experts and their softmax gates, and, a distinct row of the tile at a time, adds ``B[:, chosen experts] @ (gated rank
activations)`` into that row's tokens' outputs, reading B's columns of the experts some token of the row chose only
(an unchosen expert's gate is zero). In torch the routing alone (``mixture_gates``: a sort,
masks, a softmax, a scatter, then the product) is about fifteen small kernels per adapted linear, and a
graph-replayed decode step is bound by its count of small kernels. Rounding as the torch form: logits, rank
activations, gates and their product each in the output's dtype; ties choose the lower expert index (a stable sort's
order)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.serve.kernels import _dot, _next_row


@triton.jit
def _gated(zp, ts, live, stride_zg, stride_zt, stride_zc, C, E, R, k, n, dt, BLOCK_E: tl.constexpr,
           BLOCK_R: tl.constexpr):
    """(mid, chosen) of a tile of tokens ``ts``: mid (BLOCK_T, BLOCK_E, BLOCK_R) fp32 their gated rank activations
    z[e R + r] gate[e] and chosen (BLOCK_T, BLOCK_E) each token's top-``k`` of its ``n`` experts (k, n: (BLOCK_T,)),
    from the partial sums at ``zp`` (z over C chunks, the logits at ``zp + stride_zg``); with k 0 (a slot without a
    routed adapter here) the gates are zero."""
    es, rs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_R)
    e_ok = es < E
    cell = es[:, None] * R + rs[None, :]
    cell_ok = live[:, None, None] & (e_ok[:, None] & (rs < R)[None, :])[None, :, :]
    z = tl.zeros((ts.shape[0], BLOCK_E, BLOCK_R), tl.float32)
    logits = tl.zeros((ts.shape[0], BLOCK_E), tl.float32)
    for c in range(C):
        at = zp + ts * stride_zt + c * stride_zc
        z += tl.load(at[:, None, None] + cell[None, :, :], mask=cell_ok, other=0.0)
        logits += tl.load(at[:, None] + stride_zg + es[None, :], mask=live[:, None] & e_ok[None, :], other=0.0)
    valid = es[None, :] < tl.maximum(n, 1)[:, None]
    logits = tl.where(valid, logits.to(dt).to(tl.float32), float("-inf"))
    li, lj = logits[:, :, None], logits[:, None, :]
    ahead = (lj > li) | ((lj == li) & (es[None, None, :] < es[None, :, None]))  # experts ranked before each one
    chosen = valid & (tl.sum(ahead.to(tl.int32), axis=2) < tl.maximum(k, 1)[:, None])
    top = tl.max(tl.where(chosen, logits, float("-inf")), axis=1)
    w = tl.where(chosen, tl.exp(logits - top[:, None]), 0.0)
    gates = tl.where((k > 0)[:, None], w / tl.sum(w, axis=1)[:, None], 0.0).to(dt).to(tl.float32)
    mid = (z.to(dt).to(tl.float32) * gates[:, :, None]).to(dt).to(tl.float32)
    return mid, chosen


@triton.jit
def _route_expand_kernel(zp_ptr, b_ptrs, rows_ptr, out_ptrs, k_ptrs, n_ptrs, T, Ns, Es, Rs, C, skip_row, stride_zg,
                         stride_zt, stride_zc, stride_bs, stride_bn, stride_ot, stride_k, stride_n, G: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """out_g[t, ns] += B_g[row(t), ns] @ mid_g[t] for a tile of BLOCK_T tokens, BLOCK_N outputs and one of the G
    tables per program (table g's z and logits at zp[2 g] and zp[2 g + 1]), a distinct row of the tile at a time:
    B's columns of the experts that some token of that row chose, read once for all of them (``tl.dot``), the product
    added to that row's tokens only; nothing for ``skip_row``."""
    tile, g = tl.program_id(0), tl.program_id(2)
    ts = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.load(rows_ptr + ts, mask=ts < T, other=skip_row).to(tl.int64)
    live = (ts < T) & (rows != skip_row)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    js = tl.arange(0, BLOCK_E * BLOCK_R)  # the flattened (expert, rank) cells of the dot's inner dimension
    for i in tl.static_range(G):  # the tables are separate tensors: a branch per table, one runs
        if g == i:
            if tl.program_id(1) * BLOCK_N < Ns[i]:  # the grid spans the widest table
                out_ptr = out_ptrs[i]
                dt = out_ptr.dtype.element_ty
                n_ok = ns < Ns[i]
                k = tl.load(k_ptrs[i] + rows * stride_k[i], mask=live, other=0.0).to(tl.float32).to(tl.int32)
                n = tl.load(n_ptrs[i] + rows * stride_n[i], mask=live, other=0.0).to(tl.float32).to(tl.int32)
                mid, chosen = _gated(zp_ptr + 2 * i * stride_zg, ts, live, stride_zg, stride_zt, stride_zc, C, Es[i],
                                     Rs[i], k, n, dt, BLOCK_E, BLOCK_R)
                mid = tl.reshape(mid, (BLOCK_T, BLOCK_E * BLOCK_R))
                if not IEEE:
                    mid = mid.to(dt)
                cols = (js // BLOCK_R) * Rs[i] + js % BLOCK_R
                acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                todo = live
                row = _next_row(todo, rows)
                while row < 2**62:
                    mine = todo & (rows == row)
                    # the experts some token of this row chose (none with k 0): the only columns of B read
                    used = tl.max((mine[:, None] & chosen & (k > 0)[:, None]).to(tl.int32), axis=0) > 0
                    read = tl.reshape(tl.broadcast_to(used[:, None], (BLOCK_E, BLOCK_R)), (BLOCK_E * BLOCK_R,)) \
                        & (js % BLOCK_R < Rs[i])
                    b = tl.load(b_ptrs[i] + row * stride_bs[i] + ns[None, :] * stride_bn[i] + cols[:, None],
                                mask=read[:, None] & n_ok[None, :], other=0.0)
                    acc += tl.where(mine[:, None], _dot(mid, b, IEEE), 0.0)
                    todo = todo & (rows != row)
                    row = _next_row(todo, rows)
                mask = live[:, None] & n_ok[None, :]
                ptrs = out_ptr + ts[:, None] * stride_ot[i] + ns[None, :]
                y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptrs, (y + acc).to(dt), mask=mask)


def route_expand(zp: torch.Tensor, tables: list[tuple], rows: torch.Tensor, skip_row: int = -1) -> None:
    """``out[t] += up[i] @ (z[t] ⊙ gates[t])`` (i = rows[t]) for each of ``tables``, given as (up (S+1, N, E R) with
    the experts' blocks of R columns in order, out (T, N), top_k (S+1, 1), experts (S+1, 1) (small integers in any
    dtype), E, R); ``zp`` (2 G, T, C, >= E R) fp32 ``row_shrink``'s partial sums of [A_0, router_0, A_1, ...] (A (S+1,
    E R, in), router (S+1, E, in)). Tokens of ``skip_row`` untouched."""
    if zp.shape[0] != 2 * len(tables):
        raise ValueError(f"route_expand: {len(tables)} tables need 2 x {len(tables)} partial sums, got {zp.shape[0]}")
    for up, out, top_k, experts, e, r in tables:
        if up.shape[2] != e * r or out.shape != (zp.shape[1], up.shape[1]) or up.stride(2) != 1 or out.stride(1) != 1:
            raise ValueError(f"route_expand: up {tuple(up.shape)}, out {tuple(out.shape)} do not fit {e} experts of rank "
                             f"{r} and {zp.shape[1]} tokens (row-major)")
    t, chunks = zp.shape[1], zp.shape[2]
    if t == 0:
        return
    ups, outs, ks, ns, es, rs = zip(*tables)
    block_e = triton.next_power_of_2(max(es))
    block_r = max(triton.next_power_of_2(max(rs)), triton.cdiv(16, block_e))  # tl.dot's inner dimension >= 16
    block_t, block_n = 16, 64
    _route_expand_kernel[(triton.cdiv(t, block_t), triton.cdiv(max(u.shape[1] for u in ups), block_n), len(tables))](
        zp, ups, rows, outs, ks, ns, t, tuple(u.shape[1] for u in ups), es, rs, chunks, skip_row, zp.stride(0),
        zp.stride(1), zp.stride(2), tuple(u.stride(0) for u in ups), tuple(u.stride(1) for u in ups),
        tuple(o.stride(0) for o in outs), tuple(v.stride(0) for v in ks), tuple(v.stride(0) for v in ns),
        G=len(tables), IEEE=any(o.dtype == torch.float32 or u.dtype != o.dtype for u, o in zip(ups, outs)),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_R=block_r)
