"""Daubechies wavelet filters and one level of the 2-D inverse discrete wavelet transform (WaveFT's synthesis).

    daubechies_filter(n):   rec_lo of dbN (2n taps, n vanishing moments): the minimum-phase factor H(z) of
                            |H(w)|^2 = 2 cos^2n(w/2) P(sin^2(w/2)),  P(y) = sum_{k<n} C(n-1+k, k) y^k,
                            i.e. (1 + z)^n times the roots of P(y(z)) inside the unit circle, scaled to sum sqrt(2)
    inverse_dwt2(D, lo):    with D (H, W) read as the sub-bands  [[cA, cH], [cV, cD]]  (each H/2 x W/2),
                            X = sum_b  up(f_b) band_b up(g_b)^T,  f_b / g_b = the rows' / columns' filter of band b
                            (cA: lo lo, cH: hi lo, cV: lo hi, cD: hi hi), rec_hi[k] = (-1)^k rec_lo[L-1-k],
                            up(f)[i, k] = f[i - 2k + (L - 2)]: a full synthesis cropped by L - 2 at each end,
                            so X is (H - L + 2, W - L + 2), the layout and crop of PyWavelets' / ptwt's waverec2

The filters come from the spectral factorisation in float64 (they agree with PyWavelets' tables to ~1e-12); the
synthesis runs as two strided transposed 1-D convolutions, so it costs O(H W L) and is differentiable.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def daubechies_filter(n: int) -> tuple[float, ...]:
    """The 2n reconstruction low-pass taps of dbN (PyWavelets' ``rec_lo`` order: the largest taps first)."""
    p = torch.tensor([float(math.comb(n - 1 + k, k)) for k in range(n)], dtype=torch.float64)
    roots = [-1.0 + 0j] * n
    if n > 1:  # roots of P(y): eigenvalues of its companion matrix
        companion = torch.diag(torch.ones(n - 2, dtype=torch.float64), -1)
        companion[0] = -p.flip(0)[1:] / p[-1]
        for y in torch.linalg.eigvals(companion).tolist():
            b = 2 - 4 * y  # y = (2 - z - 1/z) / 4  <=>  z^2 - b z + 1 = 0; keep the root inside the unit circle
            z = (b - (b * b - 4) ** 0.5) / 2
            roots.append(z if abs(z) <= 1 else 1 / z)
    coeffs = torch.tensor([1.0 + 0j], dtype=torch.complex128)
    for root in roots:  # prod (z - root), highest power first
        coeffs = torch.cat([coeffs, coeffs.new_zeros(1)]) - root * torch.cat([coeffs.new_zeros(1), coeffs])
    taps = coeffs.real
    return tuple((taps * math.sqrt(2) / taps.sum()).tolist())


def synthesis_filters(rec_lo: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 1, L): rec_lo and rec_hi as the weight of a transposed convolution with two input channels."""
    lo = torch.tensor(rec_lo, dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** k for k in range(len(rec_lo))], dtype=torch.float64)
    return torch.stack([lo, signs * lo.flip(0)]).unsqueeze(1).to(dtype=dtype, device=device)


def _synthesize_last(low: torch.Tensor, high: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """One synthesis step along the last axis: (R, m) low and high bands -> (R, 2m - L + 2)."""
    taps = filters.shape[-1]
    full = F.conv_transpose1d(torch.stack([low, high], dim=1), filters, stride=2).squeeze(1)
    return full[:, taps - 2: full.shape[-1] - (taps - 2)]


def inverse_dwt2(dense: torch.Tensor, rec_lo: tuple[float, ...]) -> torch.Tensor:
    """One level of the 2-D inverse DWT of ``dense`` (H, W even) laid out as [[cA, cH], [cV, cD]] (module doc)."""
    h, w = dense.shape[0] // 2, dense.shape[1] // 2
    filters = synthesis_filters(rec_lo, dense.dtype, dense.device)
    rows_low = _synthesize_last(dense[:h, :w], dense[h:, :w], filters)  # cA and cV: low-pass along the rows
    rows_high = _synthesize_last(dense[:h, w:], dense[h:, w:], filters)  # cH and cD
    return _synthesize_last(rows_low.t(), rows_high.t(), filters).t()
