"""Super-Tuning (PEFT's ``supertuning``): a sparse support of the weight's own entries, picked by magnitude, trains;
``r`` adds a LoRA beside it (the paper's "Supra" hybrid).

    h = (W0 + S + (alpha / r) B A) x + b,    S.flat[p_k] = supertuning_values[k],  zero elsewhere

The support p (``supertuning_indices``, (n,) int32 row-major flat positions of the (out, in) weight) is
``topk(|W0|.flat, n, largest=select_top)`` in topk's order, n = int(out * in * (1 - sparsity)); it depends on the base
weight, so it is saved (``save_precomputed_indices=True``) or recomputed from the same base on load. The values start
at 0 (``init_weights=True``; False draws N(0, 1)). With ``r``: A (r, in) Kaiming-uniform, B (out, r) zero (False:
Kaiming-uniform), ``lora_alpha`` defaults to 2 r, ``lora_dropout`` drops the LoRA path's input; the parameters are
drawn in PEFT's order (values; A and B built as ``nn.Linear``, then re-drawn), so a seed gives PEFT's initial weights.
Saved keys: ``<module>.supertuning_values``, ``<module>.supertuning_indices`` (unless not saved),
``<module>.supertuning_lora_A.weight`` / ``supertuning_lora_B.weight`` (with r).

PEFT adapts ``nn.Linear`` only; GPT-2's Conv1D is adapted here through its (out, in) view, but such files load only
here. The reference applies S as one more dense matmul of the base's size, as SHiRA's; the fast path folds it into the
base GEMM (one GEMM on W0 + S, ``fast.dense_update``) and keeps the LoRA part beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout, check_number, check_one_of
from peftlab.core.registry import register
from peftlab.methods.shira import sparse_update
from peftlab.ops import fast


def magnitude_support(weight_oi: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """The (count,) int32 flat positions of the largest (or smallest) |W| entries, in topk's order (PEFT's)."""
    return torch.topk(weight_oi.detach().abs().flatten(), k=count, largest=largest).indices.to(torch.int32)


@dataclass
class SupertuningConfig(AdapterConfig):
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

    def __post_init__(self) -> None:
        if self.r is not None and self.lora_alpha is None:  # PEFT's default, written to the file
            self.lora_alpha = 2 * self.r
        super().__post_init__()

    def validate(self) -> None:
        check_number("sparsity", self.sparsity)
        check_dropout("sparsity", self.sparsity)
        for name in ("select_top", "init_weights", "save_precomputed_indices"):
            check_one_of(name, getattr(self, name), (True, False))
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise ConfigError(f"r must be a positive integer (a LoRA beside the sparse support) or None, "
                              f"got {self.r!r}")
        if self.r is None and self.lora_alpha is not None:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} is set but r is None; the LoRA part needs an r")
        if self.lora_alpha is not None:
            check_number("lora_alpha", self.lora_alpha)
        check_number("lora_dropout", self.lora_dropout)
        check_dropout("lora_dropout", self.lora_dropout)


class SupertuningLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: SupertuningConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.out_features, self.in_features = base.out_features, base.in_features
        count = int(self.out_features * self.in_features * (1 - config.sparsity))
        if count < 1:
            raise ConfigError(f"Super-Tuning on {module_name!r}: sparsity={config.sparsity} leaves no trainable entry "
                              f"of its {self.out_features} x {self.in_features} weight")
        self.save_indices = config.save_precomputed_indices
        indices = magnitude_support(base.weight_oi(), count, config.select_top)
        self.register_buffer("supertuning_indices", indices, persistent=False)  # saved through state_tensors
        self.supertuning_values = nn.Parameter(torch.zeros(count) if config.init_weights else torch.randn(count))
        self.identity_at_init = config.init_weights
        self.r = config.r
        if config.r is not None:
            self.scaling = float(config.lora_alpha) / config.r
            self.supertuning_lora_A = nn.Linear(self.in_features, config.r, bias=False, dtype=torch.float32)
            self.supertuning_lora_B = nn.Linear(config.r, self.out_features, bias=False, dtype=torch.float32)
            nn.init.kaiming_uniform_(self.supertuning_lora_A.weight, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.supertuning_lora_B.weight)
            else:
                nn.init.kaiming_uniform_(self.supertuning_lora_B.weight, a=math.sqrt(5))
            self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def sparse_weight(self) -> torch.Tensor:
        return sparse_update(self.supertuning_indices, self.supertuning_values, self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        weight = self.sparse_weight()
        if self.r is not None:
            weight = weight + self.scaling * (self.supertuning_lora_B.weight @ self.supertuning_lora_A.weight)
        return weight

    def lora_part(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) B A dropout(x), the LoRA beside the sparse support (only with ``r``)."""
        a, b = self.supertuning_lora_A.weight, self.supertuning_lora_B.weight
        lora_in = self.dropout(x).to(fast.compute_dtype(x, a))
        return self.scaling * F.linear(F.linear(lora_in, a.to(lora_in.dtype)), b.to(lora_in.dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.supertuning_values.dtype), self.sparse_weight())
        return out if self.r is None else out + self.lora_part(x)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """One GEMM on W0 + S (``fast.dense_update``), the LoRA part (with its dropout) beside it."""
        if not fast.enabled(x):
            return None
        out = fast.dense_update(x, base, self.sparse_weight())
        if out is None or self.r is None:
            return out
        return out + self.lora_part(x).to(out.dtype)

    def param_roles(self) -> dict[str, str]:
        return {name: "B" if name.startswith("supertuning_lora_B") else "A" for name, _ in self.named_parameters()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = dict(self.named_parameters())
        if self.save_indices:
            state["supertuning_indices"] = self.supertuning_indices
        return state


# The default is the paper's Supra hybrid at PEFT's default sparsity (1% of each weight) with a LoRA of the asked rank;
# lr_scale 1: the LoRA part trains at LoRA's rate and each support entry is a weight trained directly, as SHiRA's
# (contract suite's 20 steps on the tiny Llama: LoRA 4.562 -> 4.372, this default 4.305; Super alone at sparsity 0.99
# 4.544, 0.95 4.503)
register("SUPERTUNING", SupertuningConfig, SupertuningLayer,
         default_config=lambda target_modules, r=8: SupertuningConfig(r=r, target_modules=target_modules))
