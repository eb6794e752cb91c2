"""Triton kernel for the grouped LoRA shrink and expand (the fast path of ``batched.lowrank_torch``).

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
def _grouped_matmul_kernel(inp_ptr, w_ptr, out_ptr, order_ptr, starts_ptr, slots_ptr, N, K,
                           stride_it, stride_ws, stride_wn, stride_ot,
                           ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(order_ptr + rows, mask=row_ok, other=0)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(inp_ptr + tok[:, None] * stride_it + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + slot * stride_ws + cols[None, :] * stride_wn + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    ptrs = out_ptr + tok[:, None] * stride_ot + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
