"""LN tuning (Zhao et al. 2023, arXiv 2312.11420): train a copy of each targeted normalisation layer.

    h = LN'(x),   LN' a trainable copy of the frozen LN (LayerNorm: γ' ⊙ (x - μ)/σ + β'; RMSNorm: γ' ⊙ x / rms(x))

The layer holds ``ln_tuning_layers``, a deep copy of the wrapped norm (same class, eps, ...), whose parameters start
at the base's values, so the adapted model equals the base at init. Saved keys, as PEFT's:
``<norm>.ln_tuning_layers.weight`` (features,) and, for a LayerNorm with a bias, ``<norm>.ln_tuning_layers.bias``.
Merging writes the copy's scale (and bias) into the base norm and keeps the base's own values to put back on unmerge
(PEFT swaps the two modules: the same weights either way). Targets must be norm layers (core's "norm" kind);
``default_config`` selects them by name (``NORM_TARGETS``) since "all-linear" picks linears. Several LN-tuning adapters
active on one norm: the last one gives the output (PEFT refuses that forward).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig
from peftlab.core.registry import register

# A regex (PEFT full-matches a string target) for the norm layers of common decoders: Llama / Qwen / NeoX
# (input_layernorm, post_attention_layernorm, norm, final_layer_norm), GPT-2 (ln_1, ln_2, ln_f), BERT (LayerNorm).
NORM_TARGETS = r".*(\.ln_[^.]+|[Nn]orm[^.]*)"


@dataclass
class LNTuningConfig(AdapterConfig):
    """PEFT's LNTuningConfig: only the base fields (targets, exclusions, modules_to_save)."""

    peft_absent_fields = frozenset({"layers_to_transform", "layers_pattern"})


class LNTuningLayer(AdapterLayer):
    supported_kinds = frozenset({"norm"})

    def __init__(self, base: BaseView, config: LNTuningConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.ln_tuning_layers = copy.deepcopy(base.module)
        # the base norm's own values while this adapter is merged, put back by unmerge
        self._base_weight: torch.Tensor | None = None
        self._base_bias: torch.Tensor | None = None

    def _copy_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The copy on ``x``, computed in the copy's dtype (float32 over a half-precision base) and returned in x's."""
        return self.ln_tuning_layers(x.to(self.ln_tuning_layers.weight.dtype)).to(x.dtype)

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        return self._copy_forward(x)  # the copy replaces the base norm's output

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        return self._copy_forward(x)  # alone on the module: the base norm need not run at all

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        self._base_weight = weight_oi.detach().clone()
        return self.ln_tuning_layers.weight.detach().float()

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        weight, self._base_weight = self._base_weight, None
        return weight

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        self._base_bias = bias.detach().clone()
        return self.ln_tuning_layers.bias.detach().float()

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        base_bias, self._base_bias = self._base_bias, None
        return base_bias

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ln_tuning_layers.{k}": v for k, v in self.ln_tuning_layers.state_dict(keep_vars=True).items()}


# lr_scale: like IA3's vectors (30x), a norm's scale starts at 1 and is few numbers (hidden per norm); LoRA-sized
# steps barely move it (the contract's 20 steps: loss -0.02 at 1x, -0.22 at 10x). 10x, as VeRA: the final norm scales
# every logit, so IA3's 30x is more than it needs
register("LN_TUNING", LNTuningConfig, LNTuningLayer, lr_scale=10.0,
         default_config=lambda target_modules=None, r=8: LNTuningConfig(target_modules=NORM_TARGETS))
