"""LoHa (Hyeon-Woo et al. 2022, FedPara; as in LyCORIS): Hadamard product of two low-rank matrices.

    h = W0 x + (alpha / r) * ((W1a W1b) ⊙ (W2a W2b)) x

W1a, W2a: (out, r); W1b, W2b: (r, in) — PEFT's ``hada_w1_a`` ... ``hada_w2_b``. The update can reach
rank r^2 with the parameters of a rank-2r LoRA, and is applied as one: ΔW x = U (V x) with U, V the
row- / column-wise Khatri-Rao products of the factors (``ops.factored.hadamard_lowrank``). Init (``init_weights=True``): Kaiming-uniform for
all but W2b, which is 0, so the adapted model equals the base at init; False: all Kaiming.
Rank / module dropout and per-module patterns: see ``_lycoris``. PEFT adapts only ``nn.Linear``
(not GPT-2's ``Conv1D``) with LoHa; we also adapt ``Conv1D``, but such files only load here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView
from peftlab.core.registry import register
from peftlab.methods._lycoris import LycorisConfig, LycorisLayer, kaiming_
from peftlab.ops.factored import hadamard_lowrank


@dataclass
class LoHaConfig(LycorisConfig):
    pass


class LoHaLayer(LycorisLayer):
    def __init__(self, base: BaseView, config: LoHaConfig, module_name: str):
        super().__init__(base, config, module_name)
        out_f, in_f, r = self.out_features, self.in_features, self.r
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(out_f, r)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(r, in_f)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(out_f, r)))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_f) if config.init_weights else kaiming_(torch.empty(r, in_f)))

    def build(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def apply_update(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return hadamard_lowrank(x, (self.hada_w1_a * scale).to(x.dtype), self.hada_w1_b.to(x.dtype),
                                self.hada_w2_a.to(x.dtype), self.hada_w2_b.to(x.dtype))


register("LOHA", LoHaConfig, LoHaLayer,
         default_config=lambda target_modules, r=8: LoHaConfig(r=r, alpha=2 * r, target_modules=target_modules))
