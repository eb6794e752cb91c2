"""Low-rank approximation of a dense weight update: the shared piece of conversion to LoRA.

Pure functions. `lora_from_delta` is what `convert` (any mergeable method -> LoRA), the serving
engine (methods without a batched form) and `combine --svd` use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """delta ~= B @ A with A (rank, in) and B (out, rank); `rel_error` = ||delta - BA||_F / ||delta||_F."""

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    singular_values: torch.Tensor


def lora_from_delta(delta: torch.Tensor, rank: int, *, name: str = "delta") -> LowRank:
    """Truncated SVD of a 2-D update, singular values split evenly (sqrt) between the two factors.

    Computed in float32 (float64 if `delta` is float64); the factors come back in that dtype.
    `rank` larger than min(out, in) is an error naming the layer (`name`) and its shape.
    """
    if delta.dim() != 2:
        raise ValueError(f"{name}: a LoRA factorisation needs a 2-D update, got shape {tuple(delta.shape)}")
    out_f, in_f = delta.shape
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
    if rank > min(out_f, in_f):
        raise ValueError(f"{name}: rank {rank} is larger than the layer allows "
                         f"(update of shape {out_f}x{in_f}, so at most {min(out_f, in_f)})")
    work = delta.detach().to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    total = float(S.square().sum())
    kept = float(S[:rank].square().sum())
    rel = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    return LowRank(A=A.contiguous(), B=B.contiguous(), rel_error=rel, singular_values=S)
