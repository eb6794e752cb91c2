"""Spectral kernels: FourierFT's sparse-spectrum weight and C3A's block circular correlation.

    sparse_spectrum_weight:      ΔW = Re(ifft2(S)),  S (out, in) zero except S[rows_j, cols_j] = c_j
    block_circular_correlation:  y_i = Σ_j corr(x_j, w_ij),  corr(x, w)[s] = Σ_t x[t] w[(t - s) mod b]
    block_circulant_weight:      the (out, in) matrix of that map: block (i, j) is C_ij[s, t] = w_ij[(t - s) mod b]

FFTs run in float32 at least (torch has no bfloat16 FFT and float16 only on CUDA for powers of two; float64 stays
float64), and autocast is kept out of them; results come back in that dtype and callers cast. The circulant weight is a
gather, not an FFT, so merging adds the exact matrix the FFT forward applies.
"""
from __future__ import annotations

import contextlib

import torch


def _no_autocast(device: torch.device):
    """Autocast off around FFT maths (its einsum would otherwise run in bfloat16 on complex operands)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sparse_spectrum_weight(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Re(ifft2(S)) as (out, in), for S holding ``values`` (n,) at ``indices`` (2, n) = (rows, cols)."""
    with _no_autocast(values.device):
        values = _at_least_fp32(values)
        spectrum = values.new_zeros(shape).index_put((indices[0], indices[1]), values)
        return torch.fft.ifft2(spectrum).real


def block_circular_correlation(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x (..., n*b) through the block-circulant map of ``kernel`` (m, n, b): (..., m*b), by real FFTs.

    In frequency space the correlation is a product, X_j[k] conj(W_ij[k]), so the map costs one rfft of the
    input, an (n -> m) complex product per frequency and one irfft: O(m n b) per token instead of O(m n b^2)."""
    m, n, b = kernel.shape
    with _no_autocast(x.device):
        x_freq = torch.fft.rfft(_at_least_fp32(x).reshape(*x.shape[:-1], n, b))
        w_freq = torch.fft.rfft(_at_least_fp32(kernel)).conj()
        y_freq = torch.einsum("...jk,ijk->...ik", x_freq, w_freq)
        return torch.fft.irfft(y_freq, n=b).reshape(*x.shape[:-1], m * b)


def block_circulant_weight(kernel: torch.Tensor) -> torch.Tensor:
    """The (m*b, n*b) matrix of ``block_circular_correlation`` for ``kernel`` (m, n, b), in the kernel's dtype."""
    m, n, b = kernel.shape
    pos = torch.arange(b, device=kernel.device)
    shift = (pos[None, :] - pos[:, None]) % b  # shift[s, t] = (t - s) mod b
    return kernel[:, :, shift].permute(0, 2, 1, 3).reshape(m * b, n * b)
