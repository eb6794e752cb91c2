"""The row shrink and expand with a tile's tokens of one row sharing their reads (``StepContext.static_row_lanes``;
off by default until a GPU A/B, see bench/README.md, thirty-second session).

``kernels.row_shrink`` runs one program per token and chunk of K: a decode batch of 64 tokens of one adapter reads
that adapter's A 64 times (MoLoRA's shrink, 36 rows of A a layer: 1.23 ms of a 5.0 ms decode step on an H100). Here
the tokens come in tiles of 16 and the programs of a tile in 16 lanes: lane j takes the tile's j-th distinct row (in
order of first appearance) and all of the tile's tokens of that row at once (``tl.dot``), reading that row's A once;
lanes past the tile's count of distinct rows exit. A tile of one adapter's tokens does one read where the one-token
form did 16; a tile of 16 adapters runs 16 programs side by side, as the one-token form does (the thirty-second
session's first tiled form ran a tile's rows one after another in one program, which slowed mixed batches: 8
adapters 0.71x the base step against 0.88x). The engine orders a step's requests by slot with this on, so that one
adapter's tokens share tiles. Same contracts and outputs as ``kernels.row_shrink`` / ``row_expand`` (the expand
reads B once per lane the same way); MoLoRA's route-expand and the bottleneck's sub-layer expand have theirs in
``lane_expands``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.serve.kernels import _dot, expand_args, shrink_args

BLOCK_T = 16  # tokens a tile (tl.dot's smallest tile)


@triton.jit
def _lane_row(rows, live, lane, BLOCK_T: tl.constexpr):
    """The ``lane``-th distinct row among the tile's live tokens, in order of first appearance; -1 past the last."""
    idx = tl.arange(0, BLOCK_T)
    before = idx[None, :] < idx[:, None]  # [t, u]: token u comes before token t
    same = (rows[:, None] == rows[None, :]) & live[None, :]
    first = live & (tl.sum((same & before).to(tl.int32), axis=1) == 0)  # t is its row's first token in the tile
    rank = tl.sum((first[None, :] & before).to(tl.int32), axis=1)  # first tokens before t
    return tl.max(tl.where(first & (rank == lane), rows, -1), axis=0)


@triton.jit
def _lane_tokens(rows_ptr, T, skip_row, BLOCK_T: tl.constexpr):
    """(ts, row, mine) of this program's lane (program 0's id = tile * BLOCK_T + lane): the tile's tokens, the lane's
    row (-1: none) and which of the tokens have it; the skipped row's tokens take part in no lane."""
    p = tl.program_id(0)
    ts = (p // BLOCK_T) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.load(rows_ptr + ts, mask=ts < T, other=skip_row).to(tl.int64)
    live = (ts < T) & (rows != skip_row)
    row = _lane_row(rows, live, p % BLOCK_T, BLOCK_T)
    return ts, row, live & (rows == row)


@triton.jit
def _lane_shrink_kernel(x_ptr, a_ptrs, rows_ptr, zp_ptr, T, K, Rs, chunk, skip_row, stride_xt, stride_as, stride_ar,
                        stride_zg, stride_zt, stride_zs, G: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """zp[g, t, c] = A_g[row(t), :, chunk c] @ x[t, chunk c] for the tokens of one lane's row in one tile, one chunk of
    K and one of the G tables per program; nothing for ``skip_row``."""
    c, g = tl.program_id(1), tl.program_id(2)
    ts, row, mine = _lane_tokens(rows_ptr, T, skip_row, BLOCK_T)
    if row >= 0:
        rs = tl.arange(0, BLOCK_R)
        for i in tl.static_range(G):  # the tables are separate tensors: a branch per table, one runs
            if g == i:
                r_ok = rs < Rs[i]
                acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, chunk, BLOCK_K):  # chunk: a multiple of BLOCK_K
                    ks = c * chunk + k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < K
                    x = tl.load(x_ptr + ts[:, None] * stride_xt + ks[None, :], mask=mine[:, None] & k_ok[None, :],
                                other=0.0)
                    a = tl.load(a_ptrs[i] + row * stride_as[i] + rs[None, :] * stride_ar[i] + ks[:, None],
                                mask=r_ok[None, :] & k_ok[:, None], other=0.0)
                    acc += _dot(x.to(tl.float32) if F32 else x, a, F32)
                tl.store(zp_ptr + g * stride_zg + ts[:, None] * stride_zt + c * stride_zs + rs[None, :], acc,
                         mask=mine[:, None] & r_ok[None, :])


def f32_products(act: torch.Tensor, tables) -> bool:
    """Products in fp32 (IEEE) when the activations are fp32 or a table's dtype differs from theirs; else ``tl.dot``
    in the activations' 16-bit dtype (exact products in its fp32 accumulator)."""
    return act.dtype == torch.float32 or any(w.dtype != act.dtype for w in tables)


def lane_shrink(x: torch.Tensor, downs: list[torch.Tensor], rows: torch.Tensor, skip_row: int = -1,
                max_chunks: int = 16) -> torch.Tensor:
    """``kernels.row_shrink``'s partial sums ``zp`` (G, T, C, R) fp32 by lanes of token tiles (see the module)."""
    zp, args = shrink_args(x, downs, rows, skip_row, max_chunks, min_rank_block=16, max_block_k=128)
    t = x.shape[0]
    if t:
        _lane_shrink_kernel[(triton.cdiv(t, BLOCK_T) * BLOCK_T, zp.shape[2], len(downs))](
            **args, T=t, F32=f32_products(x, downs), BLOCK_T=BLOCK_T)
    return zp


@triton.jit
def _lane_expand_kernel(zp_ptr, b_ptrs, rows_ptr, out_ptrs, scale_ptrs, T, Ns, Rs, C, skip_row, stride_zg, stride_zt,
                        stride_zs, stride_bs, stride_bn, stride_ot, stride_scale, G: tl.constexpr,
                        HAS_SCALE: tl.constexpr, F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``kernels.row_expand`` for the tokens of one lane's row in one tile, BLOCK_N outputs and one of the G tables per
    program: B's rows read once for all of them (``tl.dot``), z rounded to the output's dtype as there."""
    nb, g = tl.program_id(1), tl.program_id(2)
    ts, row, mine = _lane_tokens(rows_ptr, T, skip_row, BLOCK_T)
    if row >= 0:
        rs, cs = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_C)
        ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        for i in tl.static_range(G):
            if g == i:
                if nb * BLOCK_N < Ns[i]:  # the grid spans the widest table
                    out_ptr = out_ptrs[i]
                    n_ok, r_ok = ns < Ns[i], rs < Rs[i]
                    zp = tl.load(zp_ptr + g * stride_zg + ts[:, None, None] * stride_zt
                                 + cs[None, :, None] * stride_zs + rs[None, None, :],
                                 mask=mine[:, None, None] & (cs < C)[None, :, None] & r_ok[None, None, :], other=0.0)
                    z = tl.sum(zp, axis=1).to(out_ptr.dtype.element_ty)
                    b = tl.load(b_ptrs[i] + row * stride_bs[i] + ns[None, :] * stride_bn[i] + rs[:, None],
                                mask=n_ok[None, :] & r_ok[:, None], other=0.0)
                    mask = mine[:, None] & n_ok[None, :]
                    ptrs = out_ptr + ts[:, None] * stride_ot[i] + ns[None, :]
                    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                    if HAS_SCALE[i]:
                        y *= tl.load(scale_ptrs[i] + row * stride_scale[i] + ns, mask=n_ok,
                                     other=0.0).to(tl.float32)[None, :]
                    acc = _dot(z.to(tl.float32) if F32 else z, b, F32)
                    tl.store(ptrs, (y + acc).to(out_ptr.dtype.element_ty), mask=mask)


def lane_expand(zp: torch.Tensor, layers: list[tuple], rows: torch.Tensor, skip_row: int = -1,
                block_n: int = 128) -> None:
    """``kernels.row_expand`` by lanes of token tiles (same arguments)."""
    t = zp.shape[1]
    if t:
        ups, outs = [u for u, _, _ in layers], [o for _, o, _ in layers]
        _lane_expand_kernel[(triton.cdiv(t, BLOCK_T) * BLOCK_T, triton.cdiv(max(u.shape[1] for u in ups), block_n),
                             len(layers))](
            **expand_args(zp, layers, rows, skip_row, block_n, min_rank_block=16), T=t,
            F32=any(f32_products(o, [u]) for u, o in zip(ups, outs)), BLOCK_T=BLOCK_T)


@triton.jit
def _lane_rows_kernel(rows_ptr, live_ptr, out_ptr, BLOCK_T: tl.constexpr):
    idx = tl.arange(0, BLOCK_T)
    live = tl.load(live_ptr + idx) != 0
    tl.store(out_ptr + tl.program_id(0), _lane_row(tl.load(rows_ptr + idx), live, tl.program_id(0), BLOCK_T))


def lane_rows(rows: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The row each lane of one tile takes (-1: none), for a tile's (BLOCK_T,) ``rows`` and ``live`` flags."""
    if rows.shape != (BLOCK_T,) or live.shape != (BLOCK_T,):
        raise ValueError(f"lane_rows: rows {tuple(rows.shape)} and live {tuple(live.shape)} should be ({BLOCK_T},)")
    out = torch.empty(BLOCK_T, dtype=torch.int64, device=rows.device)
    _lane_rows_kernel[(BLOCK_T,)](rows.to(torch.int64), live.to(torch.int32), out, BLOCK_T=BLOCK_T)
    return out
