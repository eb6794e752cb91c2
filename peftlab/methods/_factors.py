"""Layers whose whole effect is a product of two factors computed from their parameters (VB-LoRA, RandLoRA, Uni-LoRA,
TinyLoRA): ``factors()`` gives (down (R, in), up (out, R)) as live tensors, and

    h = W0 x + s up (down dropout(x)),   ΔW = s up @ down,   s = ``scaling``

follows for the reference forward, the fused fast path, merging and serving alike, so each method states only its
factors. A subclass whose inner size R is its config's rank sets ``batched_serving``: the engine then serves
(down, s up) as a LoRA of rank R, exactly, instead of an SVD of ΔW made at load (RandLoRA's R is the full rank of its
bases, so it keeps the conversion).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab.core.adapter import AdapterLayer, BaseView, ServingForm
from peftlab.ops import fast


class FactorsLayer(AdapterLayer):
    """An ``AdapterLayer`` with ``delta`` / ``fused_forward`` / ``delta_weight`` from ``factors()``; subclasses set
    ``self.dropout`` (an ``nn.Module``) and may set ``self.scaling``."""

    scaling: float = 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (R, in), up (out, R)) with ΔW = scaling · up @ down."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors()
        x = x.to(fast.compute_dtype(x, down))
        down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
        return F.linear(F.linear(self.dropout(x), down), up) * self.scaling

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        if not fast.enabled(x):
            return None  # before building the factors, which the reference path builds again
        down, up = self.factors()
        return fast.lowrank(x, base, down, up, self.scaling, self.dropout)

    def delta_weight(self) -> torch.Tensor:
        down, up = self.factors()
        return (up @ down) * self.scaling

    def serving_form(self, base: BaseView) -> ServingForm | None:
        if not self.batched_serving or base.kind != "linear":
            return None
        down, up = self.factors()
        return ServingForm(down=down.detach(), up=up.detach() * self.scaling)
