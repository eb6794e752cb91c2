"""MiSS (Kang & Yin 2024, "Matrix Shard Sharing"; PEFT's successor of Bone): one small block shared by all shards.

``miss_block`` D is the only tensor; ``init_weights`` picks the variant (x a row vector, r-wide slices x_k of x, the
last one zero-padded):

    True ("balance")  D (r, out):  ΔW[o, i] = D[i mod r, o],   h = W0 x + (Σ_k x_k) D
    "mini"            D (r, mini_r), tiled mini_r-wide along the outputs:  ΔW[o, i] = D[i mod r, o mod mini_r]
    "bat"             D (out/r, r, r): each r x r block W_kj of W0 (row block k, column block j) becomes
                      W_kj (I + D_k) + D_k, a per-block update that depends on W0; unmerge is
                      W = (W' - D_k)(I + D_k)^-1 blockwise. Needs r | in and r | out.
    False             D (r, out) drawn Kaiming-uniform (PEFT's test init; not the identity), used as "balance"

D starts at zero otherwise, so the adapted model equals the base. The balance and mini forms cost one slice-sum
of x and an (r, out) product per token; "bat" builds its dense (out, in) update each forward, as PEFT does (the fast
path then runs one GEMM on W0 + ΔW: ``fast.dense_update``), and applies no ``miss_dropout`` (neither does PEFT).
With two "bat" adapters active at once on a layer, each update here reads W0, where PEFT's forward feeds the first
one's result to the second (merging chains in both).
Saved key: ``<module>.miss_block``. PEFT adapts ``nn.Linear`` only; GPT-2's ``Conv1D`` is adapted here through its
(out, in) view, but such files load only here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_dropout, check_one_of, check_positive_int
from peftlab.core.registry import register, register_variant
from peftlab.ops import fast

INIT_CHOICES = (True, False, "bat", "mini")


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Σ_k x_k over the r-wide slices of x's last dimension (..., in) -> (..., r), the last slice zero-padded."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, r).sum(dim=-2)


def tiled_update(block: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The balance / mini ΔW (out, in) of D (r, c), c dividing out: ΔW[o, i] = D[i mod r, o mod c]."""
    r, c = block.shape
    return block.t().repeat(out_features // c, -(-in_features // r))[:, :in_features]


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (out/r, r, in/r, r): [k, a, j, b] = W[k r + a, j r + b]."""
    return weight.reshape(weight.shape[0] // r, r, weight.shape[1] // r, r)


def bat_update(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The "bat" ΔW (out, in) of D (out/r, r, r) on W: block (k, j) is W_kj D_k + D_k."""
    w = _blocks(weight, block.shape[-1])
    delta = torch.einsum("kajb,kbc->kajc", w, block) + block[:, :, None, :]
    return delta.reshape(weight.shape)


def bat_restore(merged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W from W' = W + bat_update(W, D): (W'_kj - D_k)(I + D_k)^-1 per block, inverted in float32 as PEFT does."""
    r = block.shape[-1]
    eye = torch.eye(r, device=block.device, dtype=torch.float32)
    inverse = torch.linalg.inv(eye + block.float()).to(merged.dtype)
    w = _blocks(merged, r) - block.to(merged.dtype)[:, :, None, :]
    return torch.einsum("kajb,kbc->kajc", w, inverse).reshape(merged.shape)


@dataclass
class MissConfig(AdapterConfig):
    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("mini_r", self.mini_r)
        check_dropout("miss_dropout", self.miss_dropout)
        check_one_of("init_weights", self.init_weights, INIT_CHOICES)
        check_bias(self.bias, "MiSS_only")


class MissLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: MissConfig, module_name: str):
        super().__init__(base, config, module_name)
        r, out_f, in_f = config.r, base.out_features, base.in_features
        if r > in_f:
            raise ConfigError(f"MiSS on {module_name!r}: r={r} must be <= in_features={in_f}")
        self.r, self.in_features, self.out_features = r, in_f, out_f
        self.variant = config.init_weights if isinstance(config.init_weights, str) else "balance"
        if self.variant == "bat":
            if in_f % r or out_f % r:
                raise ConfigError(f"MiSS init_weights='bat' on {module_name!r}: r={r} must divide in_features={in_f} "
                                  f"and out_features={out_f} (the weight is cut into r x r blocks)")
            shape = (out_f // r, r, r)
        elif self.variant == "mini":
            if out_f % config.mini_r:
                raise ConfigError(f"MiSS init_weights='mini' on {module_name!r}: mini_r={config.mini_r} must divide "
                                  f"out_features={out_f}")
            shape = (r, config.mini_r)
        else:
            shape = (r, out_f)
        self.miss_block = nn.Parameter(torch.zeros(shape))
        if config.init_weights is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        self.identity_at_init = config.init_weights is not False
        self.dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "bat":
            raise AdapterError("MiSS 'bat' has no input-only delta; adapt() reads the base weight")
        x = x.to(fast.compute_dtype(x, self.miss_block))
        block = self.miss_block.to(x.dtype)
        y = shard_sum(self.dropout(x), self.r) @ block
        if self.variant == "mini":
            y = y.repeat(*([1] * (y.dim() - 1)), self.out_features // block.shape[1])
        return y

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self.variant != "bat":
            return out + self.delta(x).to(out.dtype)
        x = x.to(fast.compute_dtype(x, self.miss_block))
        update = bat_update(base.weight_oi().to(self.miss_block.dtype), self.miss_block)
        return out + F.linear(x, update.to(x.dtype)).to(out.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """"bat" only: one GEMM on W0 + ΔW(W0) (``fast.dense_update``); the other forms cost far less than a GEMM."""
        if self.variant != "bat" or not fast.enabled(x):
            return None
        return fast.dense_update(x, base, bat_update(base.weight_oi().to(self.miss_block.dtype), self.miss_block))

    def delta_weight(self) -> torch.Tensor:
        if self.variant == "bat":
            raise AdapterError(f"MiSS 'bat' on {self.module_name!r}: the update depends on the base weight; "
                               "use merge_into(W) - W")
        return tiled_update(self.miss_block, self.out_features, self.in_features)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self.variant == "bat":
            return weight_oi + bat_update(weight_oi, self.miss_block.to(weight_oi.dtype))
        return super().merge_into(weight_oi, base)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self.variant == "bat":
            return bat_restore(weight_oi, self.miss_block)
        return super().unmerge_from(weight_oi, base)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.miss_block}


# lr_scale 1: D is added to the weight directly, like a LoRA B that starts at zero (contract suite's 20 steps on the
# tiny Llama: LoRA 4.562 -> 4.366, MiSS 4.412; 0.3x 4.466)
register("MISS", MissConfig, MissLayer,
         default_config=lambda target_modules, r=8: MissConfig(r=r, target_modules=target_modules))
register_variant("miss_bat", "MISS", lambda target_modules, r=8: MissConfig(
    r=r, init_weights="bat", target_modules=target_modules))
register_variant("miss_mini", "MISS", lambda target_modules, r=8: MissConfig(
    r=r, mini_r=r, init_weights="mini", target_modules=target_modules))
