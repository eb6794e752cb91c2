"""Structured updates applied to activations, never forming the dense (out, in) matrix.

    LoHa       ((W1a W1b) ⊙ (W2a W2b)) x = U (V x),  U = W1a ⊙r W2a (out, r1 r2),  V = W1b ⊙c W2b (r1 r2, in)
               (⊙r / ⊙c: row- / column-wise Khatri-Rao products; ΔW_oi = Σ_pq W1a_op W2a_oq W1b_pi W2b_qi)
    LoKr       (W1 ⊗ W2) x = vec(W1 X W2^T),  X = x viewed as (c, d),  W1: (a, c), W2: (b, d)
    Householder chain  H_0 H_1 ... H_{k-1} = I - U T U^T,   H_i = I - 2 u_i u_i^T / ||u_i||^2
               T = (diag(U^T U) / 2 + strict_upper(U^T U))^{-1}   (compact WY form; U need not be unit)

Each is a handful of thin GEMMs: O(tokens * (in + out) * r1 r2) for LoHa, O(tokens * in * (a + b + rank))
for LoKr, O(tokens * in * k) for the chain, instead of O(tokens * in * out) plus an (out, in) tensor
per module. The dense builders stay in the method files as the reference (merging, tests).
"""
from __future__ import annotations

import os

import torch

from peftlab.ops.fast import no_autocast


def khatri_rao_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(n, r1), (n, r2) -> (n, r1 r2) with [o, i r2 + j] = p[o, i] q[o, j]."""
    return (p[:, :, None] * q[:, None, :]).reshape(p.shape[0], -1)


def hadamard_lowrank(x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                     w2b: torch.Tensor) -> torch.Tensor:
    """x @ ((w1a @ w1b) * (w2a @ w2b))^T over the last dimension, as a rank-(r1 r2) product."""
    u = khatri_rao_rows(w1a, w2a)
    v = khatri_rao_rows(w1b.t(), w2b.t()).t()
    return (x @ v.t()) @ u.t()


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
               w1_parts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x @ kron(W1, W2)^T over the last dimension of x (..., c d) -> (..., a b).

    ``w2`` is W2 (b, d) or its factors (W2a (b, r), W2b (r, d)); W1 (a, c) likewise through ``w1_parts``
    (then ``w1`` is ignored and may be None). Factors are applied one at a time, never multiplied out.
    """
    lead = x.shape[:-1]
    c = w1_parts[1].shape[1] if w1_parts is not None else w1.shape[1]
    xm = x.reshape(-1, c, x.shape[-1] // c)  # X: (N, c, d)
    if isinstance(w2, tuple):
        t = (xm @ w2[1].t()) @ w2[0].t()  # X W2^T: (N, c, b)
    else:
        t = xm @ w2.t()
    y = w1_parts[0] @ (w1_parts[1] @ t) if w1_parts is not None else w1 @ t  # W1 X W2^T: (N, a, b)
    return y.reshape(*lead, -1)


# householder_wy without a triangular solve (under torch.compile) up to this many reflections; off by default
# (PEFTLAB_WY_SERIES_MAX=16 turns it on): on the H200 the compiled HRA step took 122.3 ms with the product form and
# 98.0 ms with the solve (bench/results/train_step_1b_h200_hra_wy_product.json, _hra_wy_solve.json; one fresh
# process each, same call)
SERIES_MAX_RANK = min(16, int(os.environ.get("PEFTLAB_WY_SERIES_MAX", "0")))


def _small_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for tiny square matrices as a broadcast product and a sum, which torch.compile fuses with the
    elementwise work around it (a matrix product would be one library call each)."""
    return (a[:, :, None] * b[None, :, :]).sum(1)


def unit_upper_inverse(strict: torch.Tensor) -> torch.Tensor:
    """(I + K)^-1 for a strictly upper triangular K (k, k), k <= 16: K is nilpotent (K^16 = 0), so
    (I + K)^-1 = sum_j (-K)^j = (I + L)(I + L^2)(I + L^4)(I + L^8) with L = -K (three squarings, three products).
    Exact up to rounding; no triangular solve, whose library call cost ~90 us of host time each on the H200 (224 per
    HRA training step: bench/results/train_step_1b_h200_hra_boft_profile.profile.txt)."""
    k = strict.shape[0]
    if k > 16:
        raise ValueError(f"unit_upper_inverse: the product form covers k <= 16, got {k}")
    eye = torch.eye(k, device=strict.device, dtype=strict.dtype)
    power, inverse = -strict, eye - strict
    for _ in range(max(0, (k - 1).bit_length() - 1)):  # L^2, L^4, L^8 as far as they can be nonzero
        power = _small_mm(power, power)
        inverse = _small_mm(inverse, eye + power)
    return inverse


def householder_wy(u: torch.Tensor, series: bool | None = None) -> torch.Tensor:
    """T (k, k) with H_0 H_1 ... H_{k-1} = I - U T U^T for the reflections along the columns of u (n, k):
    T = M^-1, M = D + N (D = diag(U^T U) / 2, N its strict upper part) = D (I + D^-1 N).

    ``series`` (default: while torch.compile traces, for k <= SERIES_MAX_RANK, which is 0 unless
    PEFTLAB_WY_SERIES_MAX says otherwise): T = unit_upper_inverse(D^-1 N) D^-1 with no solve, a few broadcast
    products; otherwise a triangular solve. The product form was meant to save the solve's host time (~90 us each on
    the H200, 224 a step: train_step_1b_h200_hra_boft_profile.profile.txt), but measured slower there, compiled:
    122.3 ms a step against 98.0 ms with the solve (train_step_1b_h200_hra_wy_product.json, _wy_solve.json). On the
    CPU proxy (16 layers of HRA r8) it was 127 vs 69 ms eagerly (train_overhead_hra_wy_series_eager_cpu.json) and
    33.4 vs 32.3 ms compiled (train_overhead_hra_wy_cpu.json). Kept, tested, for ``series=True`` and the variable."""
    with no_autocast(u):  # in u's dtype even inside a bf16 autocast region (triangular solves have no bf16)
        gram = u.t() @ u
        half = gram.diagonal() / 2
        strict = torch.triu(gram, diagonal=1)
        if series is None:
            series = torch.compiler.is_compiling()
        if series and u.shape[1] <= SERIES_MAX_RANK:
            return unit_upper_inverse(strict / half[:, None]) / half[None, :]
        eye = torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
        return torch.linalg.solve_triangular(strict + torch.diag(half), eye, upper=True)


def householder_apply(x: torch.Tensor, u: torch.Tensor, t: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x H (transpose=False) or x H^T for row vectors x (..., n), H = I - U T U^T."""
    return x - ((x @ u) @ (t.t() if transpose else t)) @ u.t()
