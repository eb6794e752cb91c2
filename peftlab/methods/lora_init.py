"""LoRA's weight-derived initialisations as pure functions of the base weight (used by ``LoraLayer``).

- ``truncated_svd``: the r leading singular triplets, full or randomised (optionally seeded); also PSOFT's and
  AdaMSS's bases.
- PiSSA / OLoRA (``principal_factors``): B A (times the scaling) is W0's principal part, from its SVD (PiSSA;
  ``pissa_niter_K``: a randomised SVD with K power iterations) or its QR factorisation (OLoRA); the caller leaves
  the residual W0 - s B A in the base.
- orthogonal / MiCA (``zero_product_factors``): B A = 0 with non-zero factors. PEFT's "orthogonal": A and B from
  disjoint rows of one orthogonal matrix (even rank). MiCA: B = the left singular vectors of W0's r smallest
  singular values (kept frozen by the layer), A = 0.
"""
from __future__ import annotations

import torch

from peftlab.core.adapter import AdapterError, BaseView


def principal_factors(init: str, w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with s B A the rank-r principal part of ``w`` (out, in), s = ``scaling``."""
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r], q[:, :r]
    u, s, vh = truncated_svd(w, r, None if init == "pissa" else int(init.rsplit("_", 1)[-1]))
    sr = (s / scaling).sqrt()
    return sr[:, None] * vh, u * sr[None, :]


def truncated_svd(w: torch.Tensor, r: int, niter: int | None = None,
                  seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, r), S (r,), Vh (r, in)): the r leading singular triplets of ``w`` (out, in), by a full SVD, or with
    ``niter`` by ``torch.svd_lowrank`` (a random projection and ``niter`` power iterations). ``seed``: the projection
    is drawn after ``torch.manual_seed(seed)`` inside a forked RNG, so the global stream is left as it was and a
    checkpoint rebuilds the same factors (PEFT's PSOFT and AdaMSS do the same)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if seed is None:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
    else:
        fork = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
    return u[:, :r], s[:r], v[:, :r].t()


def zero_product_factors(init: str, r: int, base: BaseView, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with B A = 0 for init "orthogonal" or "mica" on ``base`` (``where``: the module)."""
    out_f, in_f = base.out_features, base.in_features
    if init == "orthogonal":
        if r % 2:
            raise AdapterError(f"init_lora_weights='orthogonal' on {where!r} needs an even rank, got {r}")
        q = torch.linalg.qr(torch.randn(r, r))[0]
        return (torch.randn(in_f, r // 2) @ q[0::2]).t() / 10.0, torch.randn(r // 2, out_f).t() @ q[1::2] / 10.0
    if r > min(out_f, in_f):
        raise AdapterError(f"init_lora_weights='mica' on {where!r}: rank {r} exceeds the weight's smaller side "
                           f"(shape {(out_f, in_f)})")
    b = torch.linalg.svd(base.weight_oi().float(), full_matrices=False)[0][:, -r:]
    return torch.zeros(r, in_f), b
