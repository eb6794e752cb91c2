"""TinyLoRA ("Learning to Reason in 13 Parameters", arXiv 2602.04118): LoRA-XS with its r x r core spanned by a few
fixed random matrices, whose u coefficients are all that trains (and may be tied across layers).

    ΔW = B R A,   R = sum_i v_i P_i                     (r, r)
    A = sqrt(S_r) V_r^T  (r, in),  B = U_r sqrt(S_r)  (out, r)      from the SVD W0 = U S V^T, frozen
    h = W0 x + B R A dropout(x)

On an embedding the SVD is of its (num_embeddings, dim) table and ΔW = B R A is added to that table (a token's
row: B[token] R A). r is capped at the smaller side of W0. P (u, r, r) ~ N(0, 1/r), frozen, drawn from a CPU
generator seeded with ``projection_seed + i`` for the i-th target in module order, so the same seed gives PEFT's P.
v (u,) belongs to a group of targets (``weight_tying``: 0 gives each target its own v, 1 one v for all; in between,
G = round(N (1 - weight_tying)) groups of consecutive targets, as PEFT splits them). v starts at 0 (identity at
init); ``init_weights="uniform"``: U(-init_v_bound, init_v_bound), drawn group by group from the global RNG as PEFT
draws them. ``init_weights=False`` leaves v unset in PEFT (``torch.empty``); here it is 0.

Saved keys (PEFT's): per layer ``tinylora_A``, ``tinylora_B`` and, with ``save_projection=True``, ``tinylora_P``;
the groups' vectors at model level, ``base_model.tinylora_v.<group>`` (live: rows of one (groups, u) parameter, each
layer's picked by an index buffer, so compiled layers share one graph). A and B are always saved (PEFT does), and
loading takes them from the file rather than from the SVD of the base at hand (which it then skips).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import BaseView, SharedTensors
from peftlab.core.config import (
    AdapterConfig, ConfigError, check_bias, check_dropout, check_number, check_one_of, check_positive_int,
)
from peftlab.core.registry import register
from peftlab.core.state import loading
from peftlab.methods._factors import FactorsLayer
from peftlab.methods._seeded import check_projection_key, projection_generator
from peftlab.methods.lora_init import principal_factors


@dataclass
class TinyLoraConfig(AdapterConfig):
    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_weights: bool | str = True

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("u", self.u)
        check_number("weight_tying", self.weight_tying)
        if not 0.0 <= self.weight_tying <= 1.0:
            raise ConfigError(f"weight_tying must be in [0, 1], got {self.weight_tying!r}")
        check_projection_key(self.projection_seed, "projection_seed")
        check_number("init_v_bound", self.init_v_bound)
        check_dropout("tinylora_dropout", self.tinylora_dropout)
        check_bias(self.bias, "tinylora_only")
        check_one_of("init_weights", self.init_weights, (True, False, "uniform"))


def tying_groups(count: int, weight_tying: float) -> list[int]:
    """The group of each of ``count`` targets (in module order): PEFT's split into round(count (1 - weight_tying))
    groups of count // groups consecutive targets, the remainder joining the last group."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return [min(i // size, groups - 1) for i in range(count)]


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r', cols), B (rows, r')) with B A the rank-r' part of ``weight``, the singular values split evenly
    (sqrt on each side); r' = min(r, rows, cols). Computed in float32, returned in ``weight``'s dtype."""
    a, b = principal_factors("pissa", weight.float(), min(r, *weight.shape), 1.0)
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def projections(seed: int, u: int, r: int) -> torch.Tensor:
    """P (u, r, r) ~ N(0, 1/r) from a CPU generator seeded with ``seed``."""
    return torch.normal(0.0, 1.0 / r ** 0.5, size=(u, r, r), generator=projection_generator(seed), device="cpu")


def tinylora_core(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """R = sum_i v[i] P[i] (r, r)."""
    return torch.einsum("i,ijk->jk", v, p.to(v.device, v.dtype))


class TinyLoraVectors(SharedTensors):
    """The trained vectors of one TinyLoRA adapter, one per group of tied targets (rows of one (groups, u) parameter:
    a layer picks its row by an index tensor, so compiled decoder layers share one graph where a lookup by the
    layer's name compiled one per layer), and each target's place."""

    def __init__(self, config: TinyLoraConfig, views: dict[str, BaseView]):
        super().__init__()
        self.index = {name: i for i, name in enumerate(views)}
        self.group = dict(zip(views, tying_groups(len(views), config.weight_tying)))
        self.groups = sorted(set(self.group.values()))
        rows = []
        for _ in self.groups:  # drawn group by group, as PEFT draws them
            v = torch.zeros(config.u)
            if config.init_weights == "uniform":
                nn.init.uniform_(v, -config.init_v_bound, config.init_v_bound)
            rows.append(v)
        self.tinylora_v = nn.Parameter(torch.stack(rows))
        self.row = {name: self.groups.index(g) for name, g in self.group.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's keys, one per group: each a view of its row."""
        return {f"tinylora_v.{g}": self.tinylora_v[i] for i, g in enumerate(self.groups)}


class TinyLoraLayer(FactorsLayer):
    supported_kinds = frozenset({"linear", "embedding"})
    batched_serving = True  # linear targets: factors of rank r (methods/_factors.py); an embedding has none

    def __init__(self, base: BaseView, config: TinyLoraConfig, module_name: str, shared: TinyLoraVectors):
        super().__init__(base, config, module_name)
        self.shared, self.save_projection = shared, config.save_projection
        self.is_embedding = base.kind == "embedding"
        weight = base.weight_oi().detach()
        table = weight.t() if self.is_embedding else weight  # an embedding's own (num_embeddings, dim) table
        if loading():  # the file holds A and B (PEFT always saves them): no SVD of a weight, only their shapes
            rank = min(config.r, *table.shape)
            a, b = table.new_zeros(rank, table.shape[1]), table.new_zeros(table.shape[0], rank)
        else:
            a, b = svd_factors(table, config.r)
        self.register_buffer("tinylora_A", a, persistent=False)
        self.register_buffer("tinylora_B", b, persistent=False)
        seed = config.projection_seed + shared.index[module_name]
        self.register_buffer("tinylora_P", projections(seed, config.u, a.shape[0]), persistent=False)
        self.dropout = nn.Dropout(config.tinylora_dropout) if config.tinylora_dropout > 0 else nn.Identity()
        self.register_buffer("tinylora_row", torch.tensor([shared.row[module_name]]), persistent=False)
        self.identity_at_init = config.init_weights != "uniform"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R A, B): on a linear target (down, up); on an embedding the table's (r, dim) and (num_embeddings, r)."""
        a = self.tinylora_A
        core = tinylora_core(self.shared.tinylora_v.index_select(0, self.tinylora_row)[0], self.tinylora_P)
        return core.to(a.device, a.dtype) @ a, self.tinylora_B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_embedding:
            return super().delta(x)
        right, rows = self.factors()
        return self.dropout(F.embedding(x, rows)) @ right  # B[ids] R A

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        return None if self.is_embedding else super().fused_forward(x, base)

    def delta_weight(self) -> torch.Tensor:
        update = super().delta_weight()  # B R A, the table's own (num_embeddings, dim) on an embedding
        return update.t() if self.is_embedding else update

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"tinylora_A": self.tinylora_A, "tinylora_B": self.tinylora_B}
        if self.save_projection:
            out["tinylora_P"] = self.tinylora_P
        return out


# default_config: the given r as the SVD rank (PEFT's default is 2) and PEFT's u = 64 coefficients per target.
# lr_scale: like VeRA, a few coefficients over frozen random directions (tiny Llama, 20 steps: loss falls 0.05 at
# LoRA's rate, 0.09 at 10x, no further at 30x or 100x: the u coefficients, not the steps, bound it)
register("TINYLORA", TinyLoraConfig, TinyLoraLayer, make_shared=TinyLoraVectors, lr_scale=10.0,
         default_config=lambda target_modules, r=8: TinyLoraConfig(r=r, target_modules=target_modules))
