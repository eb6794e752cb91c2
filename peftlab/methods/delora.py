"""DeLoRA (Bini et al. 2025): decoupled low-rank adaptation, a normalised rank-r update of bounded norm.

    ΔW = (λ / r) · B diag(1 / (||a_i|| ||b_i||)) A · diag(||W0[:, j]||)
    h = W0 x + ΔW dropout(x)

a_i is row i of A (r, in), b_i column i of B (out, r), both norms clamped below at 1e-4; ||W0[:, j]|| (in,) are the
column norms of the base weight when the adapter was built, kept fixed (``delora_w_norm``, a saved buffer). Each of
the r normalised terms has unit Frobenius norm before the column scaling, so ||ΔW||_F <= λ · max_j ||W0[:, j]||: the
learnable λ bounds how far the layer moves, apart from its direction (A, B). Init (``init_weights=True``):
Kaiming-uniform A (a = sqrt(5)), B = 0 (identity at init); False: both Kaiming. λ starts at ``delora_lambda``.
``rank_pattern`` / ``lambda_pattern`` set r / λ per module as LoRA's patterns do. PEFT's ``module_dropout`` is
dropout on the layer's input, as here.

Saved keys (PEFT's): ``delora_A`` (r, in), ``delora_B`` (out, r), ``delora_lambda`` (1,), ``delora_w_norm`` (in,).
PEFT adapts ``nn.Linear`` only; GPT-2's ``Conv1D`` works here too, but such files load only in peftlab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, ServingForm
from peftlab.core.config import AdapterConfig, check_bias, check_dropout, check_number, check_positive_int, dict_field
from peftlab.core.registry import register
from peftlab.methods.lora import pattern_value
from peftlab.ops import fast

NORM_FLOOR = 1e-4  # PEFT's clamp on the factor norms (B starts at 0)


@dataclass
class DeloraConfig(AdapterConfig):
    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True
    rank_pattern: dict = dict_field()
    lambda_pattern: dict = dict_field()

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_number("delora_lambda", self.delora_lambda)
        check_dropout("module_dropout", self.module_dropout)
        check_bias(self.bias, "delora_only")
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.lambda_pattern.items():
            check_number(f"lambda_pattern[{key!r}]", value)


def delora_scales(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int) -> torch.Tensor:
    """(r,) per-rank scale λ / r / (||a_i|| ||b_i||), the norms clamped below at NORM_FLOOR."""
    return lam / r / (a.norm(dim=1).clamp_min(NORM_FLOOR) * b.norm(dim=0).clamp_min(NORM_FLOOR))


def delora_serving_form(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int,
                        w_norm: torch.Tensor) -> ServingForm:
    """ΔW x = B (scales ⊙ ((A diag(w_norm)) x)): down = A diag(w_norm), mid_scale = scales, up = B."""
    with torch.no_grad():
        return ServingForm(down=a * w_norm, up=b.detach(), mid_scale=delora_scales(a, b, lam, r))


def delora_weight(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int, w_norm: torch.Tensor) -> torch.Tensor:
    """ΔW (out, in) = B diag(scales) A diag(w_norm)."""
    return (b * delora_scales(a, b, lam, r)) @ a * w_norm


def rank_of(config: DeloraConfig, module_name: str) -> int:
    return pattern_value(config.rank_pattern, module_name, config.r)


class DeloraLayer(AdapterLayer):
    batched_serving = True
    serves_from_state = True

    def __init__(self, base: BaseView, config: DeloraConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.r = rank_of(config, module_name)
        lam = pattern_value(config.lambda_pattern, module_name, config.delora_lambda)
        self.delora_A = nn.Parameter(torch.empty(self.r, base.in_features))
        self.delora_B = nn.Parameter(torch.empty(base.out_features, self.r))
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.delora_B)
        else:
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(lam)))
        # the base's column norms when the adapter is built (a checkpoint brings its own)
        self.register_buffer("delora_w_norm", base.weight_oi().detach().norm(dim=0))
        self.dropout = nn.Dropout(config.module_dropout) if config.module_dropout > 0 else nn.Identity()
        self.identity_at_init = bool(config.init_weights)

    def scales(self) -> torch.Tensor:
        return delora_scales(self.delora_A, self.delora_B, self.delora_lambda, self.r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.delora_A)
        h = F.linear(self.dropout(x.to(dtype)) * self.delora_w_norm.to(dtype), self.delora_A.to(dtype))
        return F.linear(h * self.scales().to(dtype), self.delora_B.to(dtype))

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        if not fast.enabled(x):
            return None
        return fast.lowrank(x, base, self.delora_A * self.delora_w_norm, self.delora_B * self.scales(), 1.0,
                            self.dropout)

    def delta_weight(self) -> torch.Tensor:
        return delora_weight(self.delora_A, self.delora_B, self.delora_lambda, self.r, self.delora_w_norm)

    def serving_form(self, base: BaseView) -> ServingForm:
        return delora_serving_form(self.delora_A, self.delora_B, self.delora_lambda, self.r, self.delora_w_norm)

    @classmethod
    def state_shapes(cls, base: BaseView, config: DeloraConfig, module_name: str) -> dict[str, tuple[int, ...]]:
        r = rank_of(config, module_name)
        return {"delora_A": (r, base.in_features), "delora_B": (base.out_features, r), "delora_lambda": (1,),
                "delora_w_norm": (base.in_features,)}

    @classmethod
    def serving_form_from_state(cls, state, base, config, module_name) -> ServingForm:
        return delora_serving_form(state["delora_A"], state["delora_B"], state["delora_lambda"],
                                   rank_of(config, module_name), state["delora_w_norm"])

    def param_roles(self) -> dict[str, str]:
        return {"delora_A": "A", "delora_B": "B", "delora_lambda": "A"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"delora_A": self.delora_A, "delora_B": self.delora_B, "delora_lambda": self.delora_lambda,
                "delora_w_norm": self.delora_w_norm}


# default_config sets delora_lambda = 1, not PEFT's 15: B starts at 0, so after the first step the normalised update
# sits at the λ bound whatever the rate, and at 15 compare's default budget diverges, in PEFT's DeLoRA too (both
# 7.1073; SmolLM2-135M, base model 4.2587). λ tried there: 1 -> 3.6497, 3 -> 3.9676, 15 -> 7.1073 (the only three
# tried; the eval set of that run picked 1). A file's own delora_lambda is always kept.
register("DELORA", DeloraConfig, DeloraLayer, lr_scale=1.0,
         default_config=lambda target_modules, r=8: DeloraConfig(r=r, delora_lambda=1.0, target_modules=target_modules))
