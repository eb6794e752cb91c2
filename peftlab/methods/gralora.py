"""GraLoRA (Jung et al. 2025): granular low-rank adaptation, the weight split into k x k blocks.

    h = W0 x + s (ΔW_blocks x + B_h A_h dropout(x)),   s = alpha / (r + hybrid_r)
    ΔW_blocks[j, n] = b_j[n]^T a_n[:, j]^T      (out/k x in/k, rank r/k; j: output block, n: input block)

with a_n = ``gralora_A[n]``, b_j = ``gralora_B[j]``, b_j[n] its n-th r/k rows and a_n[:, j] its j-th r/k columns.

The input is cut into k blocks x_n (in/k each); ``gralora_A`` (k, in/k, r) maps each to r numbers, which are cut into
k chunks of r/k; chunk j of every input block goes to output block j, where ``gralora_B`` (k, r, out/k) maps the k
chunks it receives (r numbers) to out/k outputs. Each of the k^2 blocks of ΔW thus has its own rank-r/k pair, with
LoRA's parameter count r (in + out). With ``hybrid_r`` > 0 a plain LoRA pair of that rank is added
(``gralora_A_general.weight`` (hybrid_r, in), ``gralora_B_general.weight`` (out, hybrid_r)), scaled by the same s.

Init as PEFT, in its order: per block A_n Kaiming-uniform then B_n zero, then the hybrid pair (nn.Linear's own init,
then A Kaiming, B zero), so the adapted model equals the base; ``init_weights=False`` makes B Kaiming too. The block
and hybrid parts share one dropout mask (PEFT draws one for each). Mergeable: ΔW = s (ΔW_blocks + B_h A_h).
The fused path (``fused_forward``, on CUDA by default) runs the whole update as LoRA's fused node of rank k r +
hybrid_r (``gralora_factors``: block-diagonal A, routed B), which spends k times the block part's adapter FLOPs on
zeros but saves only the input and the rank activation for backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout
from peftlab.core.registry import register
from peftlab.methods._lycoris import kaiming_
from peftlab.methods.lora import lora_down
from peftlab.ops import fast


@dataclass
class GraloraConfig(AdapterConfig):
    r: int = 32
    hybrid_r: int = 0
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_weights: bool = True

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        for name, low in (("r", 1), ("gralora_k", 1), ("hybrid_r", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a positive" if low else "a non-negative"
                raise ConfigError(f"{name} must be {kind} integer, got {value!r}")
        if self.r % self.gralora_k:
            raise ConfigError(f"r must be divisible by gralora_k, got r={self.r}, gralora_k={self.gralora_k}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ConfigError(f"alpha must be a number, got {self.alpha!r}")
        check_dropout("gralora_dropout", self.gralora_dropout)
        if self.bias not in ("none", "all", "gralora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'gralora_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be a bool, got {self.init_weights!r}")


def gralora_out(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW_blocks x for x (..., in), a (k, in/k, r), b (k, r, out/k): (..., out)."""
    k, _, r = a.shape
    lead = x.shape[:-1]
    h = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, -1), a)  # (..., n, r): r = (j, r/k)
    h = h.reshape(*lead, k, k, r // k).transpose(-3, -2).reshape(*lead, k, r)  # (..., j, r): r = (n, r/k)
    return torch.einsum("...jr,jro->...jo", h, b).reshape(*lead, -1)


def gralora_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW_blocks as (out, in): block (j, n) is b[j]'s rows of chunk n, transposed, times a[n]'s columns of chunk j,
    transposed."""
    k, in_block, r = a.shape
    out_block = b.shape[2]
    blocks = torch.einsum("nijc,jnco->joni", a.reshape(k, in_block, k, r // k), b.reshape(k, k, r // k, out_block))
    return blocks.reshape(k * out_block, k * in_block)


def init_pair(a: torch.Tensor, b: torch.Tensor, zero_b: bool) -> None:
    """A Kaiming-uniform (nn.Linear's init); B zero (the update starts at 0) or, for tests, Kaiming-uniform too."""
    kaiming_(a)
    if zero_b:
        nn.init.zeros_(b)
    else:
        kaiming_(b)


def gralora_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW_blocks as one LoRA of rank k r: A (k r, in) block-diagonal (row block n = a[n]^T on input block n) and
    B (out, k r), whose output block j reads chunk j of every input block's r numbers; B is zero elsewhere."""
    k, in_block, r = a.shape
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    down = torch.einsum("nir,nm->nrmi", a, eye).reshape(k * r, k * in_block)
    up = torch.einsum("jnco,jm->jonmc", b.reshape(k, k, r // k, -1), eye.to(b.dtype)).reshape(-1, k * r)
    return down, up


class GraloraLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: GraloraConfig, module_name: str):
        super().__init__(base, config, module_name)
        k, r, hybrid_r = config.gralora_k, config.r, config.hybrid_r
        for side, size in (("in_features", base.in_features), ("out_features", base.out_features)):
            if size % k:
                raise ConfigError(f"GRALORA on {module_name!r}: {side} {size} is not divisible by gralora_k={k}")
        self.scaling = config.alpha / (r + hybrid_r)
        blocks_a, blocks_b = [], []
        for _ in range(k):  # PEFT's draw order: A_n, then B_n, block by block
            a, b = torch.empty(r, base.in_features // k), torch.empty(base.out_features // k, r)
            init_pair(a, b, config.init_weights)
            blocks_a.append(a)
            blocks_b.append(b)
        self.gralora_A = nn.Parameter(torch.stack(blocks_a).transpose(1, 2).contiguous())  # (k, in/k, r)
        self.gralora_B = nn.Parameter(torch.stack(blocks_b).transpose(1, 2).contiguous())  # (k, r, out/k)
        self.hybrid_r = hybrid_r
        if hybrid_r:  # nn.Linear draws its own init first, as in PEFT
            self.gralora_A_general = nn.Linear(base.in_features, hybrid_r, bias=False)
            self.gralora_B_general = nn.Linear(hybrid_r, base.out_features, bias=False)
            with torch.no_grad():
                init_pair(self.gralora_A_general.weight, self.gralora_B_general.weight, config.init_weights)
        self.dropout = nn.Dropout(config.gralora_dropout) if config.gralora_dropout > 0 else nn.Identity()
        self.identity_at_init = config.init_weights

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dropped = self.dropout(x)
        out = gralora_out(dropped.to(self.gralora_A.dtype), self.gralora_A, self.gralora_B)
        if self.hybrid_r:
            out = out + self.gralora_B_general(lora_down(self.gralora_A_general, dropped))
        return out * self.scaling

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """The fused LoRA node (``fast.lowrank``) on ``gralora_factors`` plus the hybrid pair: one autograd node with
        only the input and the rank activation saved, at k times the block part's adapter FLOPs (its zeros)."""
        if not fast.enabled(x):
            return None
        down, up = gralora_factors(self.gralora_A, self.gralora_B)
        if self.hybrid_r:
            down = torch.cat([down, self.gralora_A_general.weight])
            up = torch.cat([up, self.gralora_B_general.weight], dim=1)
        return fast.lowrank(x, base, down, up, self.scaling, self.dropout)

    def delta_weight(self) -> torch.Tensor:
        weight = gralora_weight(self.gralora_A, self.gralora_B)
        if self.hybrid_r:
            weight = weight + self.gralora_B_general.weight @ self.gralora_A_general.weight
        return weight * self.scaling

    def param_roles(self) -> dict[str, str]:
        """LoRA+ roles: the A factors read the input, the B factors write the output."""
        roles = {"gralora_A": "A", "gralora_B": "B"}
        if self.hybrid_r:
            roles.update({"gralora_A_general.weight": "A", "gralora_B_general.weight": "B"})
        return roles


# lr_scale 1: LoRA's parameter count, scaling and zero-B start, so LoRA's learning rates carry over
register("GRALORA", GraloraConfig, GraloraLayer,
         default_config=lambda target_modules, r=8: GraloraConfig(r=r, alpha=2 * r, gralora_k=2,
                                                                   target_modules=target_modules))
