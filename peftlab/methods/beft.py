"""BEFT (arXiv 2509.15974): fine-tune only an added bias on the targeted projections (the paper: value projections).

    h = W0 x + b0 + beft_bias

``beft_bias``: (1, out) per target (PEFT's key and shape), zero at init (``init_weights=False``: standard normal,
for tests). Merging adds it to the base layer's bias; a target without a bias cannot take it, so such a layer is not
mergeable (PEFT refuses that merge too), and merging leaves the weight as it is. Several active BEFT adapters on one
layer add their biases. PEFT adapts ``nn.Linear`` only; GPT-2's Conv1D works here too, but such files load only in
peftlab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, check_one_of
from peftlab.core.registry import register


@dataclass
class BeftConfig(AdapterConfig):
    """PEFT's BeftConfig: the base fields and ``init_weights``; PEFT's class has no exclusion or layer selection."""

    init_weights: bool = True

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

    def validate(self) -> None:
        check_one_of("init_weights", self.init_weights, (True, False))


class BeftLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: BeftConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.has_base_bias = base.bias is not None
        self.beft_bias = nn.Parameter(torch.randn(1, base.out_features))
        if config.init_weights:
            nn.init.zeros_(self.beft_bias)
        self.identity_at_init = config.init_weights

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.has_base_bias  # the bias has nowhere to go in a layer without one

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        return (out + self.beft_bias.flatten()).to(out.dtype)  # in the wider dtype, then back (PEFT's rounding)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return weight_oi  # the weight is unchanged: the whole update is the bias (merge_bias)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return weight_oi

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.beft_bias.detach().flatten().to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias - self.beft_bias.detach().flatten().to(bias.dtype)

    def param_roles(self) -> dict[str, str]:
        return {"beft_bias": "B"}


# lr_scale: one vector per target starting at 0, as IA3's (30x) few numbers; a bias moves the logits directly, so
# 10x (as VeRA's and LN tuning's vectors) suffices
register("BEFT", BeftConfig, BeftLayer, lr_scale=10.0,
         default_config=lambda target_modules, r=8: BeftConfig(target_modules=target_modules))
