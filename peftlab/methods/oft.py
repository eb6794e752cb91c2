"""OFT (Qiu et al. 2023) in PEFT's current (>= 0.18) formulation: a block-diagonal rotation of the input.

    h = W0 (x R) + b = (W0 R^T) x + b,    R = blockdiag(R_1, ..., R_r),   R_i = cayley(S_i)

(x a row vector; the merged weight is W' = W0 R^T.)

Each block R_i (b x b, b = ``oft_block_size``, r = in_features / b) is the Cayley transform of a
skew-symmetric S_i stored as its b(b-1)/2 upper-triangular entries (``oft_R.weight``, (r, b(b-1)/2)).
``use_cayley_neumann`` uses PEFT's truncated series instead of the exact inverse. ``block_share`` keeps
one block for all positions; ``coft`` projects each S_i into an eps-ball (constrained OFT) before use;
``module_dropout`` replaces randomly chosen blocks by the identity while training (PEFT 0.21 builds this
dropout but its Linear forward never applies it; here it acts as PEFT documents it).
S = 0 at init, so R = I and the adapted layer equals the base. The rotation acts on activations
(``transforms_input``), which costs O(tokens * in * b) instead of forming the (out, in) merged weight;
on CUDA the rotation is one batched matmul per direction on strided views (``block_rotate``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_dropout
from peftlab.core.registry import register
from peftlab.ops import fast
from peftlab.ops.orthogonal import (
    block_rotate, cayley, cayley_neumann, identity_block_dropout, skew_from_upper, upper_from_skew,
)


def _nearest_divisor(n: int, wanted: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of n closest to ``wanted`` (ties go down)."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher != 0:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def oft_blocks(in_features: int, r: int, block_size: int, module_name: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer, adjusted as PEFT adjusts them (with a warning)."""
    given, name = (block_size, "oft_block_size") if r == 0 else (r, "r")
    value = given
    if in_features % given != 0 or given > in_features:
        value = _nearest_divisor(in_features, given)
        warnings.warn(f"OFT on {module_name!r}: {name}={given} does not divide in_features={in_features}; "
                      f"using {value} (as PEFT does)", stacklevel=3)
    return (in_features // value, value) if r == 0 else (value, in_features // value)


@dataclass
class OFTConfig(AdapterConfig):
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(f"set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a "
                              "non-zero value: r x oft_block_size = in_features")
        if self.oft_block_size == 1:
            raise ConfigError("oft_block_size=1 leaves no rotation (1x1 skew-symmetric blocks are zero)")
        check_dropout("module_dropout", self.module_dropout)
        check_bias(self.bias, "oft_only")
        if self.coft and not self.eps > 0:
            raise ConfigError(f"eps must be positive with coft=True, got {self.eps!r}")


class OFTLayer(AdapterLayer):
    transforms_input = True
    recomputes_pointwise = True  # 1B, H100: 0.83x the peak at 1.02x the time
    # replays as CUDA graphs since its triangle indices are no longer cached from inside the compiled trace (failed on
    # an H100 before that fix, nineteenth session; ran as graphs at 0.99x our LoRA's step in the twentieth)

    def __init__(self, base: BaseView, config: OFTConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.r, self.block_size = oft_blocks(base.in_features, config.r, config.oft_block_size, module_name)
        if self.block_size < 2:
            raise AdapterError(f"OFT on {module_name!r}: block size {self.block_size} leaves no rotation")
        stored = 1 if config.block_share else self.r
        self.oft_R = nn.Parameter(torch.zeros(stored, self.block_size * (self.block_size - 1) // 2))
        self.coft, self.eps = config.coft, config.eps
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.module_dropout = config.module_dropout
        if config.init_weights is False:
            nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        self.identity_at_init = config.init_weights is not False

    @torch.no_grad()
    def _project(self) -> None:
        """COFT: pull each S_i into the Frobenius ball of radius eps / sqrt(#blocks), in place (as PEFT)."""
        skew = skew_from_upper(self.oft_R, self.block_size)
        radius = self.eps / torch.sqrt(torch.tensor(float(skew.shape[0])))
        norm = skew.norm(dim=(1, 2), keepdim=True)
        self.oft_R.copy_(upper_from_skew(torch.where(norm <= radius, skew, radius * skew / norm)))

    def blocks(self, dropout: bool = True) -> torch.Tensor:
        """The r rotation blocks (r, b, b); block dropout only in training and when asked for."""
        if self.coft:
            self._project()
        skew = skew_from_upper(self.oft_R, self.block_size)
        rot = cayley(skew) if self.neumann_terms is None else cayley_neumann(skew, self.neumann_terms)
        if dropout and self.training and self.module_dropout > 0 and rot.shape[0] > 1:
            rot = identity_block_dropout(rot, self.module_dropout)
        return rot.expand(self.r, -1, -1) if rot.shape[0] == 1 else rot

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.oft_R)
        return block_rotate(x.to(dtype), self.blocks().to(dtype)).to(x.dtype)

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        return out  # all of OFT's effect is in transform_input

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        """W' = W R^T: each row w of W becomes w R^T = block_rotate(w, blocks^T)."""
        return block_rotate(weight_oi, self.blocks(dropout=False).transpose(-2, -1).to(weight_oi.dtype))

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        """W = W' R^{-T} (an inverse, not a transpose: the Neumann form is only nearly orthogonal)."""
        inverse = torch.linalg.inv(self.blocks(dropout=False).to(weight_oi.dtype))
        return block_rotate(weight_oi, inverse.transpose(-2, -1))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.oft_R}


register("OFT", OFTConfig, OFTLayer,
         default_config=lambda target_modules, r=8: OFTConfig(r=0, oft_block_size=4 * r, target_modules=target_modules))
