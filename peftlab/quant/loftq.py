"""LoftQ (Li et al. 2023): a LoRA initialisation that absorbs the quantization error of the base.

Quantizing W (out, in) to 4 bits loses W - deq(Q(W)). LoftQ alternates

    Q_t = deq(quant(W - C_{t-1}))          C_0 = 0
    C_t = best rank-r approximation of W - Q_t   (truncated SVD)

and starts training from base Q_T and adapter s B A = C_T, so that Q_T + s B A is closer to W than Q(W) alone.
The base is rewritten to Q_T in full precision; quantizing it again later (bitsandbytes, same type and blocksize)
gives back the same codes, so the adapter matches the 4-bit base it trains on.

The quantizers are bitsandbytes' formats written as torch operators (no GPU needed):

- ``loftq_bits=4``: NF4, one absmax per 64 consecutive weights of the row-major (out, in) matrix, each weight
  rounded to the nearest of the 16 NF4 levels (a value on a midpoint goes to the lower level, as bitsandbytes'
  comparisons do); as PEFT's LoftQ, single-level statistics (no double quantization);
- ``loftq_bits=8``: bitsandbytes' int8 row-wise format, round(w * 127 / absmax_row).

PEFT's LoftQ sets A = sqrt(S) V^T and B = U sqrt(S) without the LoRA scaling, so its Q + s B A matches W only when
s = alpha / r = 1. Here A and B are divided by sqrt(s): Q + s B A = Q + C for any alpha. The rewritten base is the
same as PEFT's for the same quantizer (C_t does not depend on how it is split), so adapters load across.
"""
from __future__ import annotations

import torch

from peftlab.quant.dequant import _blockwise

# bitsandbytes' NF4 levels (float32), lowest first
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
LOFTQ_BITS = (4, 8)
BLOCKSIZE = 64


def nf4_round_trip(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """deq(quant_nf4(w)) in float32: bitsandbytes' blockwise NF4 (absmax per ``blocksize`` weights of the flat
    tensor), computed with torch operators. A last partial block uses its own absmax."""
    flat = w.float().reshape(-1)
    n = flat.numel()
    short = -n % blocksize
    blocks = torch.cat([flat, flat.new_zeros(short)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.bucketize(scaled, midpoints)  # midpoint -> lower level
    return _blockwise(codes.reshape(-1), levels, absmax, blocksize)[:n].view(w.shape)


def int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    """deq(quant_int8(w)) in float32: bitsandbytes' row-wise int8 (round(w * 127 / absmax_row))."""
    w = w.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.round(w * (127 / safe)).clamp(-127, 127) * (safe / 127)


def round_trip(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return nf4_round_trip(w)
    if bits == 8:
        return int8_round_trip(w)
    raise ValueError(f"loftq_bits must be one of {LOFTQ_BITS}, got {bits!r}")


@torch.no_grad()
def loftq_factors(weight_oi: torch.Tensor, bits: int, rank: int, iters: int,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, A, B), float32: the quantized base Q_T (dense) and factors with base + scaling * B @ A ~ W.
    ``iters`` alternations (each one quantization and one SVD)."""
    if iters < 1:
        raise ValueError(f"loftq_iter must be >= 1, got {iters!r}")
    w = weight_oi.float()
    correction = torch.zeros_like(w)
    for _ in range(iters):
        base = round_trip(w - correction, bits)
        u, s, vh = torch.linalg.svd(w - base, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        b, a = u[:, :rank] * root[None, :], root[:, None] * vh[:rank]
        correction = scaling * (b @ a)
    return base, a, b
