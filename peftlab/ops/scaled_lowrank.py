"""Low-rank update with per-rank and per-output scaling vectors (VeRA, Tied-LoRA).

    ΔW = diag(b) B diag(d) A        A: (r, in), B: (out, r), d: (r,), b: (out,)
    ΔW x = b ⊙ (B (d ⊙ (A x)))

The forward never forms ΔW; ``scaled_lowrank_weight`` is the dense reference used for merging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d_vec: torch.Tensor,
                   b_vec: torch.Tensor) -> torch.Tensor:
    """b_vec ⊙ (B (d_vec ⊙ (A x))) over the last dimension of ``x``."""
    x = x.to(d_vec.dtype)  # shared A, B may sit on another device when layers are spread over several
    return b_vec * F.linear(d_vec * F.linear(x, a.to(x.device, x.dtype)), b.to(x.device, x.dtype))


def scaled_lowrank_weight(a: torch.Tensor, b: torch.Tensor, d_vec: torch.Tensor, b_vec: torch.Tensor) -> torch.Tensor:
    """diag(b_vec) B diag(d_vec) A as (out, in)."""
    return (b_vec[:, None] * b) @ (d_vec[:, None] * a)
