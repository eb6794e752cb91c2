"""LoRA on an ``nn.Parameter`` (PEFT's ``target_parameters``), e.g. a 3-D MoE expert stack W of (E, out, in):

    W'_e = W_e + s * B_e A_e,   s = alpha / r   (rsLoRA: alpha / sqrt(r)),   e = 0 .. E-1

All experts' factors live in one A (r*E, in) and one B (out, r*E), PEFT's layout: expert e uses rows
e*r .. e*r+r-1 of A and columns e, E+e, 2E+e, ... of B (``expert_factors``). A 2-D weight is one expert. B starts
at zero, so the adapted model equals the base at init. Core (peftlab/core/params.py) runs the owning module with
``merge_into(W)`` in place of W; dropout cannot be applied to an update folded into the weight, so it is refused
(``LoraConfig.validate``), as in PEFT.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer
from peftlab.core.config import ConfigError
from peftlab.methods.lora import LoraConfig, rank_and_scaling


def expert_factors(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r*E, in), B (out, r*E) -> per-expert A_e (E, r, in), B_e (E, out, r), as PEFT splits them."""
    return a.reshape(num_experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)


def add_expert_update(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W (E, out, in) + scaling * B_e A_e for every expert, without a separate (E, out, in) update tensor."""
    a_e, b_e = expert_factors(a.to(w.dtype), b.to(w.dtype), w.shape[0])
    return torch.baddbmm(w, b_e, a_e, alpha=scaling)


def validate_target_parameters(config: LoraConfig) -> None:
    """``config.target_parameters`` is a list of names, and the options parameter LoRA cannot honour are off."""
    names = config.target_parameters
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"target_parameters must be a list of parameter names, got {names!r}")
    if not names:
        return
    # PEFT's parameter layer refuses the first four; the others are not implemented for parameters here
    fixed = {"lora_dropout": 0.0, "fan_in_fan_out": False, "lora_bias": False, "use_dora": False, "bias": "none"}
    bad = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
    if config.init_lora_weights not in (True, False, "gaussian"):
        bad["init_lora_weights"] = config.init_lora_weights
    if bad:
        raise ConfigError(f"target_parameters={names!r} does not work with {bad}; parameter LoRA needs "
                          f"{fixed} and init_lora_weights True, False or 'gaussian'")


class LoraParamLayer(AdapterLayer):
    supported_kinds = frozenset({"parameter"})

    def __init__(self, base, config: LoraConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.r, self.scaling = rank_and_scaling(config, module_name)
        self.num_experts = base.num_experts
        self.lora_A = nn.Linear(base.in_features, self.r * self.num_experts, bias=False)
        self.lora_B = nn.Linear(self.r * self.num_experts, base.out_features, bias=False)
        self.reset_parameters(config.init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str) -> None:
        if init is False:
            return  # nn.Linear's default init: not identity
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B_e A_e as (E, out, in)."""
        a_e, b_e = expert_factors(self.lora_A.weight, self.lora_B.weight, self.num_experts)
        return torch.bmm(b_e, a_e) * self.scaling

    def merge_into(self, weight_oi: torch.Tensor, base) -> torch.Tensor:
        return add_expert_update(weight_oi, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def param_roles(self) -> dict[str, str]:
        return {"lora_A.weight": "A", "lora_B.weight": "B"}
