"""Triton kernels for the grouped LoRA shrink and expand (the fast path of ``batched.lowrank_torch``).

Decode steps (a few tokens per slot) use ``fused_lowrank``: shrink and expand in one launch. Prefill
steps (many tokens per slot) use ``grouped_matmul`` twice, so the rank activations are computed once.
The fixed-shape (graph-replayed) decode step uses ``row_lowrank``: every token's slot read on the device, a
shrink kernel and an expand kernel that each read the token's factors once, in place (no gathered copy).

One kernel serves both directions: ``out[t, n] (+)= sum_k inp[t, k] * w[slot(t), n, k]`` with the tokens of
each slot gathered through the segment order, so each program multiplies a tile of one slot's tokens
by a tile of that slot's matrix (``tl.dot``). Shrink: w = A (S+1, R, in), N = R. Expand: w = B
(S+1, out, R), N = out, accumulate into the layer output. Tests run it under ``TRITON_INTERPRET=1``
on the CPU against the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.serve.batched import Segments


@triton.jit
def _segment_rows(order_ptr, starts_ptr, slots_ptr, BLOCK_M: tl.constexpr):
    """(token rows, their mask, the slot) of this program's tile of its segment."""
    seg = tl.program_id(0)
    end = tl.load(starts_ptr + seg + 1)
    rows = tl.load(starts_ptr + seg) + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    return tl.load(order_ptr + rows, mask=row_ok, other=0), row_ok, tl.load(slots_ptr + seg).to(tl.int64)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in fp32; IEEE (fp32 inputs) avoids TF32, so fp32 serving matches torch's fp32 matmul."""
    if IEEE:
        out = tl.dot(a, b.to(a.dtype), input_precision="ieee")
    else:
        out = tl.dot(a, b.to(a.dtype))
    return out


@triton.jit
def _gathered_product(inp_ptr, w_ptr, tok, row_ok, slot, cols, col_ok, K, stride_it, stride_ws, stride_wn,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of inp[tok] @ w[slot, cols]^T over K."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(inp_ptr + tok[:, None] * stride_it + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + slot * stride_ws + cols[None, :] * stride_wn + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc += _dot(a, w, IEEE)
    return acc


@triton.jit
def _store_rows(out_ptr, acc, tok, row_ok, cols, col_ok, stride_ot, ACCUMULATE: tl.constexpr):
    ptrs = out_ptr + tok[:, None] * stride_ot + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_matmul_kernel(inp_ptr, w_ptr, out_ptr, order_ptr, starts_ptr, slots_ptr, N, K,
                           stride_it, stride_ws, stride_wn, stride_ot,
                           ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tok, row_ok, slot = _segment_rows(order_ptr, starts_ptr, slots_ptr, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = _gathered_product(inp_ptr, w_ptr, tok, row_ok, slot, cols, col_ok, K, stride_it, stride_ws, stride_wn,
                            IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    _store_rows(out_ptr, acc, tok, row_ok, cols, col_ok, stride_ot, ACCUMULATE)


@triton.jit
def _fused_lowrank_kernel(x_ptr, a_ptr, b_ptr, out_ptr, order_ptr, starts_ptr, slots_ptr, N, K, R,
                          stride_xt, stride_as, stride_ar, stride_bs, stride_bn, stride_ot,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    """out[t, n] += sum_r B[s, n, r] * (sum_k A[s, r, k] x[t, k]): shrink and expand in one program, which
    recomputes its tokens' rank-R activations (cheap for the few tokens per slot of a decode step)."""
    tok, row_ok, slot = _segment_rows(order_ptr, starts_ptr, slots_ptr, BLOCK_M)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    z = _gathered_product(x_ptr, a_ptr, tok, row_ok, slot, rs, r_ok, K, stride_xt, stride_as, stride_ar,
                          IEEE, BLOCK_M, BLOCK_R, BLOCK_K)
    zt = z.to(x_ptr.dtype.element_ty)  # the rank activations in the input dtype, as the two-kernel path stores them
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    bt = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + rs[:, None],
                 mask=col_ok[None, :] & r_ok[:, None], other=0.0)
    _store_rows(out_ptr, _dot(zt, bt, IEEE), tok, row_ok, cols, col_ok, stride_ot, True)


def fused_lowrank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, out: torch.Tensor, seg: Segments,
                  block_m: int = 16, block_n: int = 128, block_k: int = 128) -> None:
    """``out[t] += up[s] @ (down[s] @ x[t])`` in one launch; x (T, in), down (S+1, R, in), up (S+1, out, R)."""
    if seg.empty:
        return
    if x.stride(1) != 1 or down.stride(2) != 1 or up.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("fused_lowrank needs row-major (contiguous last dimension) inputs")
    r, k, n = down.shape[1], down.shape[2], up.shape[1]
    if up.shape[2] != r or x.shape[1] != k or out.shape[1] != n:
        raise ValueError(f"fused_lowrank: shapes x {tuple(x.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}, "
                         f"out {tuple(out.shape)} do not fit")
    block_r = max(16, triton.next_power_of_2(r))
    grid = (len(seg.slots_cpu), triton.cdiv(seg.max_len, block_m), triton.cdiv(n, block_n))
    _fused_lowrank_kernel[grid](x, down, up, out, seg.order, seg.starts, seg.slots, n, k, r,
                                x.stride(0), down.stride(0), down.stride(1), up.stride(0), up.stride(1), out.stride(0),
                                IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                BLOCK_R=block_r)


def grouped_matmul(inp: torch.Tensor, w: torch.Tensor, out: torch.Tensor, seg: Segments, accumulate: bool,
                   block_m: int = 16, block_n: int = 32, block_k: int = 32) -> None:
    """``out[t] (+)= w[slot(t)] @ inp[t]`` for the tokens of ``seg``; inp (T, K), w (S+1, N, K), out (T, N)."""
    if seg.empty:
        return
    if inp.stride(1) != 1 or w.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("grouped_matmul needs row-major (contiguous last dimension) inputs")
    n, k = w.shape[1], w.shape[2]
    if inp.shape[1] != k or out.shape[1] != n:
        raise ValueError(f"grouped_matmul: shapes inp {tuple(inp.shape)}, w {tuple(w.shape)}, out {tuple(out.shape)} "
                         "do not fit (inp (T, K), w (S, N, K), out (T, N))")
    grid = (len(seg.slots_cpu), triton.cdiv(seg.max_len, block_m), triton.cdiv(n, block_n))
    _grouped_matmul_kernel[grid](inp, w, out, seg.order, seg.starts, seg.slots, n, k,
                                 inp.stride(0), w.stride(0), w.stride(1), out.stride(0),
                                 ACCUMULATE=accumulate, IEEE=inp.dtype == torch.float32,
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


@triton.jit
def _row_shrink_kernel(x_ptr, a_ptrs, rows_ptr, zp_ptr, K, Rs, chunk, skip_row, stride_xt, stride_as, stride_ar,
                       stride_zg, stride_zt, stride_zs, G: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """zp[g, t, c] = A_g[row(t), :, chunk c] @ x[t, chunk c]: one token, one chunk of K and one of the G tables (layers
    that read the same input: q / k / v) per program, every rank (the chunks' partial sums are added by the expand
    kernel), nothing for ``skip_row``. Split over K, so that no program walks all of K alone: the
    one-program-per-4-ranks form took ~6 us a launch on the H200, the largest adapter cost of a decode step
    (bench/results/serve/profile_1b_h200_2026-12-03a.json), ~3.7 us split (profile_1b_h200.json)."""
    t, c, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(rows_ptr + t).to(tl.int64)
    if row != skip_row:
        for i in tl.static_range(G):  # the tables are separate tensors: a branch per table, one runs
            if g == i:
                rs = tl.arange(0, BLOCK_R)
                r_ok = rs < Rs[i]
                acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for k0 in range(0, chunk, BLOCK_K):  # chunk: a multiple of BLOCK_K
                    ks = c * chunk + k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < K
                    x = tl.load(x_ptr + t * stride_xt + ks, mask=k_ok, other=0.0).to(tl.float32)
                    a = tl.load(a_ptrs[i] + row * stride_as[i] + rs[:, None] * stride_ar[i] + ks[None, :],
                                mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    acc += tl.sum(a * x[None, :], axis=1)
                tl.store(zp_ptr + g * stride_zg + t * stride_zt + c * stride_zs + rs, acc, mask=r_ok)


@triton.jit
def _row_expand_kernel(zp_ptr, b_ptrs, rows_ptr, out_ptrs, scale_ptrs, Ns, Rs, C, skip_row, stride_zg, stride_zt,
                       stride_zs, stride_bs, stride_bn, stride_ot, stride_scale, G: tl.constexpr,
                       HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out_g[t, ns] = (scale_g[row(t), ns] ⊙) out_g[t, ns] + B_g[row(t), ns] @ z_g[t] for one token, BLOCK_N outputs
    and one of the G tables per program, z_g[t] = the sum of the shrink's C partial sums rounded to the output's dtype
    (as the torch form stores the rank activations); nothing for ``skip_row``, whose scales are ones."""
    t, g = tl.program_id(0), tl.program_id(2)
    row = tl.load(rows_ptr + t).to(tl.int64)
    if row != skip_row:
        for i in tl.static_range(G):
            if g == i:
                out_ptr = out_ptrs[i]
                ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = ns < Ns[i]
                rs = tl.arange(0, BLOCK_R)
                r_ok = rs < Rs[i]
                cs = tl.arange(0, BLOCK_C)
                zp = tl.load(zp_ptr + g * stride_zg + t * stride_zt + cs[:, None] * stride_zs + rs[None, :],
                             mask=(cs < C)[:, None] & r_ok[None, :], other=0.0)
                z = tl.sum(zp, axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)
                b = tl.load(b_ptrs[i] + row * stride_bs[i] + ns[:, None] * stride_bn[i] + rs[None, :],
                            mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                ptrs = out_ptr + t * stride_ot[i] + ns
                y = tl.load(ptrs, mask=n_ok, other=0.0).to(tl.float32)
                if HAS_SCALE[i]:
                    y *= tl.load(scale_ptrs[i] + row * stride_scale[i] + ns, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(ptrs, (y + tl.sum(b * z[None, :], axis=1)).to(out_ptr.dtype.element_ty), mask=n_ok)


def row_lowrank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
                skip_row: int = -1, out_scale: torch.Tensor | None = None, max_chunks: int = 16,
                block_n: int = 128, lanes: bool = False) -> None:
    """``out[t] = out_scale[i] ⊙ out[t] + up[i] @ (down[i] @ x[t])`` with i = rows[t] (no scaling when ``out_scale``
    is None), tokens whose row is ``skip_row`` untouched; x (T, in), down (S+1, R, in), up (S+1, out, R), rows (T,)
    on the device, out_scale (S+1, out). The shrink is split into at most ``max_chunks`` chunks of K per token (fp32
    partial sums); the rank activations are rounded to the output's dtype before the expand, as the batched products
    of the torch form round them."""
    row_lowrank_group(x, [(down, up, out, out_scale)], rows, skip_row, max_chunks, block_n, lanes)


MAX_GROUP = 3  # layers per launch of row_lowrank_group (q / k / v)


def row_lowrank_group(x: torch.Tensor, layers: list[tuple], rows: torch.Tensor, skip_row: int = -1,
                      max_chunks: int = 16, block_n: int = 128, lanes: bool = False) -> None:
    """``row_lowrank`` for up to MAX_GROUP layers that read the same input ``x`` (q / k / v, gate / up), each given as
    (down, up, out, out_scale or None): one shrink launch and one expand launch for all of them."""
    if not 1 <= len(layers) <= MAX_GROUP:
        raise ValueError(f"row_lowrank_group: 1 to {MAX_GROUP} layers per launch, got {len(layers)}")
    t, k = x.shape
    for down, up, out, out_scale in layers:
        tensors = [x, down, up, out] + ([out_scale] if out_scale is not None else [])
        if any(v.stride(-1) != 1 for v in tensors):
            raise ValueError("row_lowrank needs row-major (contiguous last dimension) inputs")
        r, n = down.shape[1], up.shape[1]
        if (up.shape[2] != r or down.shape[2] != k or out.shape != (t, n) or rows.shape != (t,)
                or (out_scale is not None and out_scale.shape[1] != n)):
            raise ValueError(f"row_lowrank: shapes x {tuple(x.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}, "
                             f"rows {tuple(rows.shape)}, out {tuple(out.shape)}"
                             + (f", out_scale {tuple(out_scale.shape)}" if out_scale is not None else "")
                             + " do not fit")
    if t == 0:
        return
    downs, ups, outs, scales = zip(*layers)
    row_expand(row_shrink(x, list(downs), rows, skip_row, max_chunks, lanes), list(zip(ups, outs, scales)), rows,
               skip_row, block_n, lanes)


def row_shrink(x: torch.Tensor, downs: list[torch.Tensor], rows: torch.Tensor, skip_row: int = -1,
               max_chunks: int = 16, lanes: bool = False) -> torch.Tensor:
    """The rank activations' partial sums ``zp`` (G, T, C, R) fp32 of up to MAX_GROUP tables ``downs`` (S+1, R_g, K)
    read by each token's row (row-major last dimension): ``zp[g, t].sum(0)[:R_g] = downs[g][rows[t]] @ x[t]``,
    K split into C chunks; nothing is written for tokens of ``skip_row`` (their values are undefined). ``lanes``:
    a tile's tokens of one row share their reads (``lane_kernels.lane_shrink``; StepContext.static_row_lanes)."""
    if lanes:
        from peftlab.serve.lane_kernels import lane_shrink

        return lane_shrink(x, downs, rows, skip_row, max_chunks)
    zp, args = shrink_args(x, downs, rows, skip_row, max_chunks, min_rank_block=1, max_block_k=256)
    if x.shape[0]:
        _row_shrink_kernel[(x.shape[0], zp.shape[2], len(downs))](**args)
    return zp


def shrink_args(x: torch.Tensor, downs: list[torch.Tensor], rows: torch.Tensor, skip_row: int, max_chunks: int,
                min_rank_block: int, max_block_k: int) -> tuple[torch.Tensor, dict]:
    """The row shrink kernels' output ``zp`` (G, T, C, R) fp32 and the keyword arguments they share: K split into at
    most ``max_chunks`` chunks of whole (BLOCK_R, BLOCK_K) tiles of A (BLOCK_R at least ``min_rank_block``)."""
    k = x.shape[1]
    ranks = tuple(d.shape[1] for d in downs)
    block_r = max(min_rank_block, triton.next_power_of_2(max(ranks)))
    block_k = max(32, min(max_block_k, 4096 // block_r))  # an (R, BLOCK_K) tile of A per step of a program
    chunk = triton.cdiv(triton.cdiv(k, max_chunks), block_k) * block_k
    zp = torch.empty(len(downs), x.shape[0], triton.cdiv(k, chunk), max(ranks), device=x.device, dtype=torch.float32)
    return zp, dict(x_ptr=x, a_ptrs=tuple(downs), rows_ptr=rows, zp_ptr=zp, K=k, Rs=ranks, chunk=chunk,
                    skip_row=skip_row, stride_xt=x.stride(0), stride_as=tuple(d.stride(0) for d in downs),
                    stride_ar=tuple(d.stride(1) for d in downs), stride_zg=zp.stride(0), stride_zt=zp.stride(1),
                    stride_zs=zp.stride(2), G=len(downs), BLOCK_R=block_r, BLOCK_K=block_k)


def row_expand(zp: torch.Tensor, layers: list[tuple], rows: torch.Tensor, skip_row: int = -1,
               block_n: int = 128, lanes: bool = False) -> None:
    """``out_g[t] = (scale_g[rows[t]] ⊙) out_g[t] + up_g[rows[t]] @ z_g[t]`` for each ``layers[g]`` = (up (S+1, N_g,
    R_g), out (T, N_g), scale (S+1, N_g) or None), z_g[t] = ``zp[g, t]`` (C, R) summed over C and rounded to the
    output's dtype; tokens of ``skip_row`` untouched. ``lanes``: ``lane_kernels.lane_expand``."""
    if lanes:
        from peftlab.serve.lane_kernels import lane_expand

        lane_expand(zp, layers, rows, skip_row, block_n)
        return
    if zp.shape[1]:
        _row_expand_kernel[(zp.shape[1], triton.cdiv(max(u.shape[1] for u, _, _ in layers), block_n), len(layers))](
            **expand_args(zp, layers, rows, skip_row, block_n, min_rank_block=1))


def expand_args(zp: torch.Tensor, layers: list[tuple], rows: torch.Tensor, skip_row: int, block_n: int,
                min_rank_block: int) -> dict:
    """The keyword arguments the row expand kernels share (``row_expand``'s; BLOCK_R at least ``min_rank_block``)."""
    ups, outs, scales = zip(*layers)
    ranks = tuple(u.shape[2] for u in ups)
    scale_ptrs = tuple(rows if s is None else s for s in scales)  # a table without scale: any tensor, never read
    return dict(zp_ptr=zp, b_ptrs=ups, rows_ptr=rows, out_ptrs=outs, scale_ptrs=scale_ptrs,
                Ns=tuple(u.shape[1] for u in ups), Rs=ranks, C=zp.shape[2], skip_row=skip_row, stride_zg=zp.stride(0),
                stride_zt=zp.stride(1), stride_zs=zp.stride(2), stride_bs=tuple(u.stride(0) for u in ups),
                stride_bn=tuple(u.stride(1) for u in ups), stride_ot=tuple(o.stride(0) for o in outs),
                stride_scale=tuple(0 if s is None else s.stride(0) for s in scales), G=len(layers),
                HAS_SCALE=tuple(s is not None for s in scales), BLOCK_N=block_n,
                BLOCK_R=max(min_rank_block, triton.next_power_of_2(max(ranks))),
                BLOCK_C=triton.next_power_of_2(zp.shape[2]))


@triton.jit
def _row_scaled_matmul_kernel(z_ptr, w_ptr, rows_ptr, out_ptr, in_ptr, outs_ptr, T, N, K, stride_zt, stride_wn,
                              stride_ot, stride_in, stride_outs, HAS_IN: tl.constexpr, HAS_OUT: tl.constexpr,
                              IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """out[t, ns] += out_scale[row(t), ns] ⊙ (W[ns] @ (in_scale[row(t)] ⊙ z[t])) for a tile of tokens and outputs:
    one shared W read once per tile of tokens (VeRA's projection), the per-token vectors read by row."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < T
    rows = tl.load(rows_ptr + ts, mask=t_ok, other=0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        mask = t_ok[:, None] & k_ok[None, :]
        z = tl.load(z_ptr + ts[:, None] * stride_zt + ks[None, :], mask=mask, other=0.0)
        if HAS_IN:  # scaled, then rounded to z's dtype, as the torch form's separate product rounds it
            s = tl.load(in_ptr + rows[:, None] * stride_in + ks[None, :], mask=mask, other=0.0)
            z = (z.to(tl.float32) * s.to(tl.float32)).to(z_ptr.dtype.element_ty)
        w = tl.load(w_ptr + ns[None, :] * stride_wn + ks[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += _dot(z, w, IEEE)
    mask = t_ok[:, None] & n_ok[None, :]
    if HAS_OUT:
        acc *= tl.load(outs_ptr + rows[:, None] * stride_outs + ns[None, :], mask=mask, other=0.0).to(tl.float32)
    ptrs = out_ptr + ts[:, None] * stride_ot + ns[None, :]
    tl.store(ptrs, (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_scale_kernel(x_ptr, table_ptr, rows_ptr, out_ptr, N, stride_xt, stride_table, stride_ot,
                      BLOCK_N: tl.constexpr):
    """out[t, ns] = table[row(t), ns] ⊙ x[t, ns]."""
    t = tl.program_id(0)
    row = tl.load(rows_ptr + t).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    x = tl.load(x_ptr + t * stride_xt + ns, mask=n_ok, other=0.0).to(tl.float32)
    s = tl.load(table_ptr + row * stride_table + ns, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + ns, (x * s).to(out_ptr.dtype.element_ty), mask=n_ok)


def _check_rows(name: str, rows: torch.Tensor, t: int, tables: dict[str, torch.Tensor | None], n: dict[str, int]):
    """Shape errors of the row kernels' per-slot tables: each (S+1, n[name]) with row-major rows."""
    if rows.shape != (t,):
        raise ValueError(f"{name}: rows {tuple(rows.shape)} should be ({t},)")
    for key, table in tables.items():
        if table is not None and (table.dim() != 2 or table.shape[1] != n[key] or table.stride(1) != 1):
            raise ValueError(f"{name}: {key} {tuple(table.shape)} should be (slots + 1, {n[key]}), row-major")


def row_scaled_matmul(z: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
                      in_scale: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                      block_t: int = 32, block_n: int = 32, block_k: int = 128) -> None:
    """``out[t] += out_scale[i] ⊙ (w @ (in_scale[i] ⊙ z[t]))``, i = rows[t] (each scale optional): z (T, K),
    w (N, K) shared by every token, out (T, N), scales (S+1, K) and (S+1, N). VeRA's expand with both of its
    vectors in one launch, the projection read once per tile of tokens."""
    t, k = z.shape
    n = w.shape[0]
    if z.stride(1) != 1 or w.stride(1) != 1 or out.stride(1) != 1 or w.shape[1] != k or out.shape != (t, n):
        raise ValueError(f"row_scaled_matmul: shapes z {tuple(z.shape)}, w {tuple(w.shape)}, out {tuple(out.shape)} "
                         "do not fit (z (T, K), w (N, K), out (T, N), row-major)")
    _check_rows("row_scaled_matmul", rows, t, {"in_scale": in_scale, "out_scale": out_scale},
                {"in_scale": k, "out_scale": n})
    if t == 0:
        return
    grid = (triton.cdiv(t, block_t), triton.cdiv(n, block_n))
    _row_scaled_matmul_kernel[grid](
        z, w, rows, out, rows if in_scale is None else in_scale, rows if out_scale is None else out_scale, t, n, k,
        z.stride(0), w.stride(0), out.stride(0), 0 if in_scale is None else in_scale.stride(0),
        0 if out_scale is None else out_scale.stride(0), HAS_IN=in_scale is not None, HAS_OUT=out_scale is not None,
        IEEE=z.dtype == torch.float32, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)


def row_scale(x: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, block_n: int = 1024) -> torch.Tensor:
    """``table[rows[t]] ⊙ x[t]`` for every token in one launch (no gathered copy of the table's rows); x (T, N)."""
    t, n = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"row_scale: x {tuple(x.shape)} should be row-major")
    _check_rows("row_scale", rows, t, {"table": table}, {"table": n})
    out = torch.empty_like(x)
    if t:
        _row_scale_kernel[(t, triton.cdiv(n, block_n))](x, table, rows, out, n, x.stride(0), table.stride(0),
                                                        out.stride(0), BLOCK_N=block_n)
    return out
