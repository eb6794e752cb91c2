"""HiRA (Huang et al. 2025, Hadamard high-rank adaptation): a low-rank product gates the base weight entrywise.

    h = W0 x + (W0 ⊙ (B A)) dropout(x) + b,    A (r, in), B (out, r)

so W' = W0 ⊙ (1 + B A): the update keeps W0's rank, not r. The fast path (linear targets, no active dropout) runs
one GEMM on W0 + W0 ⊙ (B A) instead of two (``fast.dense_update``, as the dense-update methods do). Keys:
``hira_A`` / ``hira_B`` on linear targets (GPT-2's ``Conv1D`` too, through its (out, in) view),
``hira_embedding_A`` (r, num_embeddings) / ``hira_embedding_B`` (dim, r) on embeddings, whose rows are looked up as
W0[ids] ⊙ (A^T[ids] B^T) (no dropout there, as in PEFT). Init as PEFT draws it: both factors standard normal, then
for linear targets ``init_weights=True``: A Kaiming-uniform, B = 0; ``"gaussian"``: A ~ N(0, 1/r^2), B = 0;
False / None: left random (not the identity). Embeddings: A = 0, B standard normal unless ``init_weights=False``.
``rank_pattern`` is accepted but, as in PEFT 0.21.2 (whose HiRA dispatcher builds every new layer with ``config.r``),
changes no rank, so files keep loading both ways; a config that sets it warns.

Merge: W' = W ⊙ (1 + B A) of the current weight; unmerge divides by (1 + B A) (refused where an entry is exactly 0).
PEFT instead keeps a copy of the weight from before its first merge: for one merged adapter both give W0 ⊙ (1 + B A),
but two HiRA adapters merged into one layer compound here (W0 (1 + Δ1)(1 + Δ2)) where PEFT adds (W0 (1 + Δ1 + Δ2)),
which is what the unmerged forward of both computes in both libraries.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, check_dropout, check_one_of, check_positive_int, dict_field
from peftlab.core.registry import register
from peftlab.ops import fast

INIT_CHOICES = (True, False, None, "gaussian")


@dataclass
class HiraConfig(AdapterConfig):
    r: int = 32
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    init_weights: bool | str | None = True
    rank_pattern: dict = dict_field()

    def validate(self) -> None:
        check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        check_dropout("hira_dropout", self.hira_dropout)
        if self.rank_pattern:
            warnings.warn(f"HiRA rank_pattern={self.rank_pattern!r} has no effect: PEFT builds every HiRA layer with "
                          f"r={self.r}, and so does peftlab, so that files load both ways", stacklevel=3)
        check_one_of("init_weights", self.init_weights, INIT_CHOICES)


class HiraLayer(AdapterLayer):
    supported_kinds = frozenset({"linear", "embedding"})

    def __init__(self, base: BaseView, config: HiraConfig, module_name: str):
        super().__init__(base, config, module_name)
        r = config.r
        self.is_embedding = base.kind == "embedding"
        a, b = torch.randn(r, base.in_features), torch.randn(base.out_features, r)
        init = config.init_weights
        if self.is_embedding:
            if init is not False:
                nn.init.zeros_(a)
                nn.init.normal_(b)
            self.identity_at_init = init is not False
            self.hira_embedding_A, self.hira_embedding_B = nn.Parameter(a), nn.Parameter(b)
        else:
            if init:
                if init is True:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                else:
                    nn.init.normal_(a, std=1 / r)
                nn.init.zeros_(b)
            self.identity_at_init = bool(init)
            self.hira_A, self.hira_B = nn.Parameter(a), nn.Parameter(b)
        self.dropout = nn.Dropout(config.hira_dropout) if config.hira_dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of either kind of target."""
        if self.is_embedding:
            return self.hira_embedding_A, self.hira_embedding_B
        return self.hira_A, self.hira_B

    def hadamard_factor(self) -> torch.Tensor:
        """B A as (out, in): the entrywise factor of the base weight in the update."""
        a, b = self.factors()
        return b @ a

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        a, b = self.factors()
        dtype = fast.compute_dtype(x, a)  # ids (embedding): the factors' dtype
        if self.is_embedding:  # only the looked-up rows: W0[ids] ⊙ (A^T[ids] B^T)
            rows = F.embedding(x, base.weight_oi().t()).to(dtype) * (F.embedding(x, a.t()) @ b.t()).to(dtype)
            return out + rows.to(out.dtype)
        update = base.weight_oi().to(dtype) * self.hadamard_factor().to(dtype)
        return out + F.linear(self.dropout(x.to(dtype)), update).to(out.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """Linear targets without active dropout: one GEMM on W0 + W0 ⊙ (B A) (``fast.dense_update``)."""
        if self.is_embedding or not fast.enabled(x) or fast.dropout_live(self.dropout):
            return None
        dtype = fast.compute_dtype(x, self.hira_A)
        return fast.dense_update(x, base, base.weight_oi().to(dtype) * self.hadamard_factor().to(dtype))

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return weight_oi + weight_oi * self.hadamard_factor().detach().to(weight_oi.dtype)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        factor = 1 + self.hadamard_factor().detach().to(weight_oi.dtype)
        if bool((factor == 0).any()):
            raise AdapterError(f"HiRA on {self.module_name!r}: an entry of 1 + B A is exactly 0, so the merge "
                               "cannot be undone")
        return weight_oi / factor

    def param_roles(self) -> dict[str, str]:
        if self.is_embedding:
            return {"hira_embedding_A": "embedding", "hira_embedding_B": "embedding"}
        return {"hira_A": "A", "hira_B": "B"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())


# lr_scale 10 (measured): the update is B A scaled entrywise by |W0| (~0.02 in LLMs and the tiny test models), so LoRA's
# rate barely moves it; on the contract suite's 20 steps (tiny Llama, base lr 1e-2) LoRA goes 4.562 -> 4.366, HiRA at
# 1x -> 4.552, 10x -> 4.396, 30x -> 4.233. MiSS and SHiRA at 1x: 4.412 and 4.384.
register("HIRA", HiraConfig, HiraLayer, lr_scale=10.0,
         default_config=lambda target_modules, r=8: HiraConfig(r=r, target_modules=target_modules))
