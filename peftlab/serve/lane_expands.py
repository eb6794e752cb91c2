"""MoLoRA's route-expand and the bottleneck's sub-layer expand by lanes of token tiles
(``StepContext.static_routed_lanes``, on by default since the thirty-fifth session's A/B on an H100).

``route_kernel.route_expand`` runs one program per token: 64 tokens of one MoLoRA adapter read that adapter's B
columns 64 times (658 us of a 5.0 ms decode step on an H100, thirty-second session). Here, as in ``lane_kernels``,
the tokens come in tiles of 16 and lane j of a tile takes the tile's j-th distinct row with all of its tokens: the
gates of each of those tokens (the same top-k softmax and rounding as the one-token kernel), then one ``tl.dot`` of
their gated rank activations with B's columns of the experts that some token of the row chose, read once. Columns
of experts no token of the row chose are never read; tokens of other rows are never written.

The sub-layer expand (``sublayer_kernel.sublayer_expand``, 576 us of a bottleneck decode step) the same way: a lane
takes its row's tokens, their activations phi(z + down_bias) and one ``tl.dot`` with the row's up projection, read
once, then the blend. It writes every token (its output is a new tensor), so the identity row's tokens take a lane
of their own, with z = 0 (the shrink wrote nothing for them)."""
from __future__ import annotations

import triton
import triton.language as tl

from peftlab.serve.kernels import _dot
from peftlab.serve.lane_kernels import BLOCK_T, _lane_tokens, f32_products
from peftlab.serve.route_kernel import _tile_gated
from peftlab.serve.sublayer_kernel import _phi


@triton.jit
def _lane_route_expand_kernel(zp_ptr, b_ptrs, rows_ptr, out_ptrs, k_ptrs, n_ptrs, T, Ns, Es, Rs, C, skip_row,
                              stride_zg, stride_zt, stride_zc, stride_bs, stride_bn, stride_ot, stride_k, stride_n,
                              G: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """out_g[t, ns] += B_g[row, ns] @ mid_g[t] for the tokens t of one lane's row in one tile, BLOCK_N outputs and one
    of the G tables per program (table g's z and logits at zp[2 g] and zp[2 g + 1])."""
    nb, g = tl.program_id(1), tl.program_id(2)
    ts, row, mine = _lane_tokens(rows_ptr, T, skip_row, BLOCK_T)
    if row >= 0:
        ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        js = tl.arange(0, BLOCK_E * BLOCK_R)  # the flattened (expert, rank) cells: the dot's inner dimension
        for i in tl.static_range(G):  # the tables are separate tensors: a branch per table, one runs
            if g == i:
                if nb * BLOCK_N < Ns[i]:  # the grid spans the widest table
                    out_ptr = out_ptrs[i]
                    dt = out_ptr.dtype.element_ty
                    k = tl.load(k_ptrs[i] + row * stride_k[i]).to(tl.float32).to(tl.int32)
                    n = tl.load(n_ptrs[i] + row * stride_n[i]).to(tl.float32).to(tl.int32)
                    mid, chosen = _tile_gated(zp_ptr + 2 * i * stride_zg, ts, mine, stride_zg, stride_zt, stride_zc,
                                              C, Es[i], Rs[i], k, n, dt, BLOCK_T, BLOCK_E, BLOCK_R)
                    mid = tl.reshape(mid, (BLOCK_T, BLOCK_E * BLOCK_R))
                    # B's columns of the experts some token of the row chose (none with k 0): the only ones read
                    used = tl.max(chosen.to(tl.int32), axis=0)  # (BLOCK_E,): 1 where some token chose the expert
                    es = tl.arange(0, BLOCK_E)
                    cells = tl.sum(tl.where(es[None, :] == (js // BLOCK_R)[:, None], used[None, :], 0), axis=1)
                    read = (tl.where(k > 0, cells, 0) > 0) & (js % BLOCK_R < Rs[i])
                    n_ok = ns < Ns[i]
                    cols = (js // BLOCK_R) * Rs[i] + js % BLOCK_R
                    b = tl.load(b_ptrs[i] + row * stride_bs[i] + ns[None, :] * stride_bn[i] + cols[:, None],
                                mask=read[:, None] & n_ok[None, :], other=0.0)
                    acc = _dot(mid if F32 else mid.to(dt), b, F32)
                    mask = mine[:, None] & n_ok[None, :]
                    ptrs = out_ptr + ts[:, None] * stride_ot[i] + ns[None, :]
                    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                    tl.store(ptrs, (y + acc).to(dt), mask=mask)


def lane_route_expand(args: dict, tables: list[tuple], t: int) -> None:
    """``route_kernel.route_expand`` by lanes of token tiles: ``args`` its kernels' shared arguments
    (``route_kernel.route_args``) for ``tables`` and ``t`` tokens."""
    block_e = triton.next_power_of_2(max(args["Es"]))
    block_r = max(triton.next_power_of_2(max(args["Rs"])), triton.cdiv(16, block_e))  # tl.dot's inner dimension >= 16
    block_n = 64
    _lane_route_expand_kernel[(triton.cdiv(t, BLOCK_T) * BLOCK_T, triton.cdiv(max(args["Ns"]), block_n), len(tables))](
        **args, T=t, F32=any(f32_products(o, [u]) for u, o, *_ in tables), BLOCK_T=BLOCK_T, BLOCK_N=block_n,
        BLOCK_E=block_e, BLOCK_R=block_r)


@triton.jit
def _lane_sublayer_kernel(zp_ptr, rows_ptr, y_ptr, out_ptr, db_ptr, up_ptr, ub_ptr, keep_ptr, scaling_ptr, T, H, W, C,
                          skip_row, stride_zt, stride_zc, stride_yt, stride_ot, stride_db, stride_us, stride_un,
                          stride_ub, stride_keep, stride_scaling, ACT: tl.constexpr, F32: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """``sublayer_kernel``'s formula for the tokens of one lane's row in one tile and BLOCK_N outputs per program."""
    ts, row, mine = _lane_tokens(rows_ptr, T, -1, BLOCK_T)  # every row has lanes, the identity row's too
    if row >= 0:
        dt = out_ptr.dtype.element_ty
        ws, cs = tl.arange(0, BLOCK_W), tl.arange(0, BLOCK_C)
        w_ok = ws < W
        chunks = C * (row != skip_row).to(tl.int32)  # the shrink wrote nothing for skip_row's tokens: z = 0 there
        zp = tl.load(zp_ptr + ts[:, None, None] * stride_zt + cs[None, :, None] * stride_zc + ws[None, None, :],
                     mask=mine[:, None, None] & (cs < chunks)[None, :, None] & w_ok[None, None, :], other=0.0)
        z = tl.sum(zp, axis=1) + tl.load(db_ptr + row * stride_db + ws, mask=w_ok, other=0.0).to(tl.float32)[None, :]
        h = _phi(z.to(dt).to(tl.float32), ACT).to(dt)
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < H
        up = tl.load(up_ptr + row * stride_us + ns[None, :] * stride_un + ws[:, None],
                     mask=n_ok[None, :] & w_ok[:, None], other=0.0)
        update = _dot(h.to(tl.float32) if F32 else h, up, F32) \
            + tl.load(ub_ptr + row * stride_ub + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        keep = tl.load(keep_ptr + row * stride_keep).to(tl.float32)
        scaling = tl.load(scaling_ptr + row * stride_scaling).to(tl.float32)
        mask = mine[:, None] & n_ok[None, :]
        y = tl.load(y_ptr + ts[:, None] * stride_yt + ns[None, :], mask=mask, other=0.0).to(tl.float32)
        out = (y * keep).to(dt).to(tl.float32) + (scaling * update.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(out_ptr + ts[:, None] * stride_ot + ns[None, :], out.to(dt), mask=mask)


def lane_sublayer_expand(args: dict, t: int) -> None:
    """``sublayer_kernel.sublayer_expand`` by lanes of token tiles: ``args`` the arguments its kernels share, for
    ``t`` tokens."""
    block_w = max(16, triton.next_power_of_2(args["W"]))  # tl.dot's inner dimension >= 16
    block_n = max(16, min(128, 8192 // block_w))  # a (W, BLOCK_N) tile of up per lane
    _lane_sublayer_kernel[(triton.cdiv(t, BLOCK_T) * BLOCK_T, triton.cdiv(args["H"], block_n))](
        **args, T=t, F32=f32_products(args["y_ptr"], [args["up_ptr"]]), BLOCK_T=BLOCK_T, BLOCK_N=block_n,
        BLOCK_W=block_w)
