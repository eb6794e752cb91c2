"""What the LyCORIS methods (LoHa, LoKr) share: config fields, per-module rank/alpha, dropouts.

Each defines a dense update from small factors and adds it like LoRA:

    h = W0 x + ΔW x,    ΔW = (alpha / r) * build()     (build() is method-specific, (out, in))

In the forward, ``apply_update`` computes ΔW x from the factors without building ΔW (LoHa as a
rank-r^2 product, LoKr on the reshaped activation: ``peftlab.ops.factored``); ``build()`` is the dense
reference, used for merging and by the tests.

with PEFT's training-time regularisers:
  rank_dropout     each output row of ΔW is zeroed with probability p; LoHa rescales the kept
                   rows by 1 / (fraction kept), LoKr only when ``rank_dropout_scale``.
  module_dropout   the whole update is skipped for a forward pass with probability p.
``rank_pattern`` / ``alpha_pattern`` override r / alpha per module (PEFT's regex-on-name-tail rule).
Conv layers are not adapted here, so ``use_effective_conv2d`` is accepted and has no effect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout, check_positive_int, dict_field
from peftlab.methods.lora import pattern_value
from peftlab.ops import fast


@dataclass
class LycorisConfig(AdapterConfig):
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    rank_pattern: dict = dict_field()
    alpha_pattern: dict = dict_field()

    init_choices: ClassVar[tuple] = (True, False)

    def validate(self) -> None:
        check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for name in ("rank_dropout", "module_dropout"):
            check_dropout(name, getattr(self, name))
        init = self.init_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init in self.init_choices)):
            raise ConfigError(f"init_weights must be one of {self.init_choices}, got {self.init_weights!r}")


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init, which PEFT uses for every non-zero LyCORIS factor."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LycorisLayer(AdapterLayer):
    """Base for LoHa / LoKr layers: subclasses create their factors and implement ``build()``."""

    recomputes_pointwise = True  # 1B, H100: LoHa 0.79x the peak at 1.02x the time, LoKr 0.86x at 1.05x

    def __init__(self, base: BaseView, config: LycorisConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.r = pattern_value(config.rank_pattern, module_name, config.r)
        self.scaling = pattern_value(config.alpha_pattern, module_name, config.alpha) / self.r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.rescale_rank_dropout = True

    def build(self) -> torch.Tensor:
        """The unscaled update as (out, in)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.build() * self.scaling

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return out
        return out + self.delta(x).to(out.dtype)

    def apply_update(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x @ (scale * build())^T over the last dimension, in x's dtype; override with a factored form."""
        return F.linear(x, (self.build() * scale).to(x.dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(fast.compute_dtype(x, next(iter(self._parameters.values()))))
        out = self.apply_update(x, self.scaling)
        if self.training and self.rank_dropout:  # rank dropout zeroes rows of ΔW, i.e. outputs
            keep = (torch.rand(self.out_features, device=out.device) > self.rank_dropout).to(out.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean().clamp_min(1.0 / self.out_features)
            out = out * keep
        return out
