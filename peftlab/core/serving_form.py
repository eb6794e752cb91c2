"""``ServingForm``: one adapter on one linear layer in the form the serving engine batches (see
``AdapterLayer.serving_form``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ServingForm:
    """One adapter on one linear layer, in the form the serving engine batches across adapters:

        y = out_scale ⊙ (W0 (in_scale ⊙ x)) + bias_scale ⊙ b0 + up_scale ⊙ (up (mid_scale ⊙ (down x)))

    Every field is optional (None = identity / absent); ``bias_scale`` is ``out_scale`` when
    ``scale_bias`` is set, else 1. LoRA: down = A, up = s B. DoRA: additionally out_scale = m / ||W0 + s B A||
    (folded into ``up`` too). IA3: out_scale (and scale_bias) or in_scale. VeRA: down/up are the frozen shared
    projections (``shared_projection`` says so, so the engine may store them once for many adapters),
    mid_scale = lambda_d, up_scale = lambda_b.
    """

    down: torch.Tensor | None = None  # (r, in)
    up: torch.Tensor | None = None  # (out, r)
    mid_scale: torch.Tensor | None = None  # (r,)
    up_scale: torch.Tensor | None = None  # (out,)
    out_scale: torch.Tensor | None = None  # (out,)
    in_scale: torch.Tensor | None = None  # (in,)
    scale_bias: bool = False
    shared_projection: bool = False

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def vera_like(self) -> bool:
        """A low-rank part with shared projections or per-rank / per-output scales (VeRA's shape), not plain down/up."""
        return self.shared_projection or self.mid_scale is not None or self.up_scale is not None

    def apply(self, x: torch.Tensor, weight_oi: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The adapted output for input ``x`` (..., in): the dense reference of the batched kernels."""
        xin = x if self.in_scale is None else x * self.in_scale
        y = nn.functional.linear(xin, weight_oi)
        if self.out_scale is not None:
            y = y * self.out_scale
        if bias is not None:
            y = y + (bias * self.out_scale if self.scale_bias and self.out_scale is not None else bias)
        if self.down is not None:
            z = nn.functional.linear(x, self.down)
            if self.mid_scale is not None:
                z = z * self.mid_scale
            low = nn.functional.linear(z, self.up)
            y = y + (low if self.up_scale is None else low * self.up_scale)
        return y

    def to(self, *args: Any, **kwargs: Any) -> "ServingForm":
        moved = {k: (v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return ServingForm(**moved)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in vars(self).values() if isinstance(v, torch.Tensor))
