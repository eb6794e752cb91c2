"""VeRA (Kopiczko et al. 2024): one frozen random pair for the whole model, per-layer vectors.

    h = W0 x + Λ_b B Λ_d A dropout(x),    Λ_b = diag(vera_lambda_b), Λ_d = diag(vera_lambda_d)

A: (r, in_max) and B: (out_max, r) are shared by every adapted layer of the adapter (each layer
uses the top-left ``A[:, :in]`` and ``B[:out, :]``), frozen, and drawn exactly as PEFT draws them:
a CPU ``torch.Generator`` seeded with ``projection_prng_key`` fills A then B with Kaiming-uniform
values (bound sqrt(6 / fan_in)), so the same key gives PEFT's matrices. Only the vectors train:
``vera_lambda_b`` (out,) starts at 0 (identity at init), ``vera_lambda_d`` (r,) at ``d_initial``.

With ``save_projection=True`` the checkpoint holds A and B under PEFT's model-level keys
``base_model.vera_A`` / ``base_model.vera_B``; with False they are regenerated from the key on load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, ServingForm
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout, check_positive_int
from peftlab.core.registry import register
from peftlab.methods._seeded import KaimingProjections, check_projection_key
from peftlab.ops import fast
from peftlab.ops.scaled_lowrank import scaled_lowrank, scaled_lowrank_weight


@dataclass
class VeraConfig(AdapterConfig):
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    init_weights: bool = True

    peft_neutral_fields = {"bias": "none"}
    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_projection_key(self.projection_prng_key)
        check_dropout("vera_dropout", self.vera_dropout)
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ConfigError(f"d_initial must be a number, got {self.d_initial!r}")


class VeraProjections(KaimingProjections):
    """The frozen A (r, in_max) and B (out_max, r) of one VeRA adapter."""

    prefix, method = "vera", "VeRA"


class VeraLayer(AdapterLayer):
    batched_serving = True
    recomputes_pointwise = True  # 1B, H100: 0.93x the peak at 1.01x the time

    def __init__(self, base: BaseView, config: VeraConfig, module_name: str, shared: VeraProjections):
        super().__init__(base, config, module_name)
        self.shared = shared
        self.in_features, self.out_features = base.in_features, base.out_features
        self.vera_lambda_b = nn.Parameter(torch.ones(base.out_features))
        self.vera_lambda_d = nn.Parameter(torch.randn(config.r))
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        if config.init_weights:
            with torch.no_grad():
                self.vera_lambda_b.zero_()
                self.vera_lambda_d.fill_(config.d_initial)

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared.sliced(self.in_features, self.out_features)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._projections()
        return scaled_lowrank(self.dropout(x), a, b, self.vera_lambda_d, self.vera_lambda_b)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        a, b = self._projections()
        return fast.scaled_lowrank(x, base, a, b, self.vera_lambda_d, self.vera_lambda_b, 1.0, self.dropout)

    def serving_form(self, base: BaseView) -> ServingForm:
        a, b = self._projections()
        return ServingForm(down=a, up=b, mid_scale=self.vera_lambda_d.detach(), up_scale=self.vera_lambda_b.detach(),
                           shared_projection=True)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._projections()
        return scaled_lowrank_weight(a, b, self.vera_lambda_d, self.vera_lambda_b)


register("VERA", VeraConfig, VeraLayer, make_shared=VeraProjections, lr_scale=10.0,
         default_config=lambda target_modules, r=8: VeraConfig(r=16 * r, target_modules=target_modules))
