"""Tied-LoRA (Renduchintala et al. 2024): one trainable low-rank pair tied across layers.

    h = W0 x + s diag(v) B diag(u) A dropout(x),    s = lora_alpha / r

A: (r, in) and B: (out, r) are shared by all targeted layers of the same shape (in, out) — one
trainable pair per shape, so q_proj of every block uses the same A and B — while u: (r,) and
v: (out,) are per layer. Gradients of A and B accumulate over every layer that uses them.

Init (``init_weights=True``): A and B Kaiming-uniform (as LoRA's A), u = 1, v = 0. So ΔW = 0 and
the adapted model equals the base at init; v gets a gradient at once, and through it A, B and u.
``init_weights=False`` sets v = 1 (not identity; for tests).

Not a PEFT method: peft_type "TIED_LORA". The checkpoint uses PEFT's layout: per layer
``base_model.model.<path>.tied_lora_u`` / ``tied_lora_v``, and the shared pairs at model level,
``base_model.tied_lora_A.<out>x<in>`` / ``base_model.tied_lora_B.<out>x<in>``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.registry import register
from peftlab.ops.scaled_lowrank import scaled_lowrank, scaled_lowrank_weight


@dataclass
class TiedLoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_weights: bool = True

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be a bool, got {self.init_weights!r}")


def shape_key(view: BaseView) -> str:
    return f"{view.out_features}x{view.in_features}"


class TiedPairs(SharedTensors):
    """The trainable A (r, in) and B (out, r) of one adapter, one pair per targeted layer shape."""

    def __init__(self, config: TiedLoraConfig, views: dict[str, BaseView]):
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, view in sorted({shape_key(v): v for v in views.values() if v.kind == "linear"}.items()):
            self.lora_A[key] = nn.Parameter(torch.empty(config.r, view.in_features))
            self.lora_B[key] = nn.Parameter(torch.empty(view.out_features, config.r))
            nn.init.kaiming_uniform_(self.lora_A[key], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B[key], a=math.sqrt(5))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"tied_lora_A.{k}": p for k, p in self.lora_A.items()}
        out.update({f"tied_lora_B.{k}": p for k, p in self.lora_B.items()})
        return out


class TiedLoraLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: TiedLoraConfig, module_name: str, shared: TiedPairs):
        super().__init__(base, config, module_name)
        self.shared = shared
        self.in_features, self.out_features = base.in_features, base.out_features
        self.key = shape_key(base)
        self.scaling = config.lora_alpha / config.r
        self.tied_lora_u = nn.Parameter(torch.ones(config.r))
        self.tied_lora_v = nn.Parameter(torch.zeros(base.out_features) if config.init_weights
                                        else torch.ones(base.out_features))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    @property
    def A(self) -> nn.Parameter:
        return self.shared.lora_A[self.key]

    @property
    def B(self) -> nn.Parameter:
        return self.shared.lora_B[self.key]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_lowrank(self.dropout(x), self.A, self.B, self.tied_lora_u, self.tied_lora_v) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return scaled_lowrank_weight(self.A, self.B, self.tied_lora_u, self.tied_lora_v) * self.scaling

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"tied_lora_u": self.tied_lora_u, "tied_lora_v": self.tied_lora_v}  # A, B: saved once, model-level

    def param_roles(self) -> dict[str, str]:
        roles = {name: "A" for name, _ in self.named_parameters()}
        roles.update({f"shared.lora_B.{k}": "B" for k in self.shared.lora_B})
        roles["tied_lora_v"] = "B"
        return roles


register("TIED_LORA", TiedLoraConfig, TiedLoraLayer, make_shared=TiedPairs,
         default_config=lambda target_modules, r=8: TiedLoraConfig(r=r, lora_alpha=2 * r,
                                                                   target_modules=target_modules))
