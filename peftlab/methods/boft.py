"""BOFT (Liu et al. 2024): OFT with a butterfly-factorised rotation and a per-output scale.

    h = s ⊙ (W0 (x M)) + b = (diag(s) W0 M^T) x + b,   M = M_{N-1} ... M_1 M_0,   M_i = P_i D_i P_i^T

(x a row vector). D_i = blockdiag of ``boft_block_num`` Cayley rotations cayley((A - A^T) / 2) of
``boft_block_size`` x ``boft_block_size`` blocks (``boft_R``: (N, blocks, size, size), full matrices),
P_i the butterfly permutation of factor i (N = ``boft_n_butterfly_factor``; N = 1 is block OFT), and
s the output scale (``boft_s``: (out, 1)); the bias is not scaled. A = 0 and s = 1 at init (identity).
The merged weight is W' = diag(s) W0 M^T. ``boft_dropout`` replaces random blocks of one random factor
by the identity while training, as PEFT does.

PEFT builds N > 1 only with its CUDA extension (without it, it silently uses N = 1: boft_R (1, ...)
while its saved config still says N); here every N runs in plain torch, on activations, with index
permutations instead of dense P_i. So on a machine without the extension (e.g. a CPU benchmark) PEFT
trains a different, smaller adapter than the config names, and its files from there hold boft_R
(1, ...), which peftlab refuses (shape mismatch) for a config with N > 1. With the extension, shapes
and outputs are the same (tests/test_parity_weight_b.py runs PEFT with a stand-in for it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_dropout
from peftlab.core.registry import register
from peftlab.ops import fast
from peftlab.ops.orthogonal import butterfly_matrix, butterfly_permutations, butterfly_rotate, cayley, \
    identity_block_dropout


def boft_blocks(in_features: int, block_size: int, block_num: int, factors: int, module_name: str) -> tuple[int, int]:
    """(block_num, block_size) for a layer, with PEFT's divisibility rules for the butterfly factors."""
    extra = 2 ** (factors - 1)

    def fail(why: str):
        raise AdapterError(f"BOFT on {module_name!r} (in_features={in_features}): {why}")

    if block_size == 0:
        if in_features % block_num:
            fail(f"boft_block_num={block_num} does not divide in_features")
        if factors > 1 and (factors - 1 > int(math.log2(block_num)) or block_num % extra):
            fail(f"boft_block_num={block_num} must be a multiple of 2^(boft_n_butterfly_factor-1)={extra}")
        block_size = in_features // block_num
    else:
        if in_features % (block_size * extra):
            fail(f"boft_block_size={block_size} x 2^(boft_n_butterfly_factor-1)={extra} does not divide in_features")
        block_num = in_features // block_size
    if factors > 1 and (block_num % 2 or block_size % 2):
        fail(f"butterfly factors need an even block count and size, got {block_num} blocks of {block_size}")
    return block_num, block_size


@dataclass
class BOFTConfig(AdapterConfig):
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(f"set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                              f"({self.boft_block_num}): boft_block_size x boft_block_num = in_features")
        factors = self.boft_n_butterfly_factor
        if not isinstance(factors, int) or isinstance(factors, bool) or factors < 1:
            raise ConfigError(f"boft_n_butterfly_factor must be a positive integer, got {factors!r}")
        check_dropout("boft_dropout", self.boft_dropout)
        check_bias(self.bias, "boft_only")


class BOFTLayer(AdapterLayer):
    transforms_input = True

    def __init__(self, base: BaseView, config: BOFTConfig, module_name: str):
        super().__init__(base, config, module_name)
        factors = config.boft_n_butterfly_factor
        num, size = boft_blocks(base.in_features, config.boft_block_size, config.boft_block_num, factors, module_name)
        self.boft_R = nn.Parameter(torch.zeros(factors, num, size, size))
        self.boft_s = nn.Parameter(torch.ones(base.out_features, 1))
        perms = butterfly_permutations(base.in_features, num, size, factors)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inverse_perms", torch.argsort(perms, dim=1), persistent=False)
        self.permuted = tuple(not torch.equal(p, torch.arange(p.numel())) for p in perms)  # factor 0: never
        self.block_dropout = config.boft_dropout
        if config.init_weights is False:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        self.identity_at_init = config.init_weights is not False

    def blocks(self, dropout: bool = True) -> torch.Tensor:
        """The rotations (N, blocks, size, size); block dropout only in training and when asked for."""
        raw = self.boft_R.flatten(0, 1)
        rot = cayley(0.5 * (raw - raw.transpose(-2, -1))).view_as(self.boft_R)
        if dropout and self.training and self.block_dropout > 0:
            factor = int(torch.randint(rot.shape[0], (1,)))
            rot = torch.cat([rot[:factor], identity_block_dropout(rot[factor], self.block_dropout)[None], rot[factor + 1:]])
        return rot

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.boft_R)
        return butterfly_rotate(x.to(dtype), self.blocks().to(dtype), self.perms, self.inverse_perms,
                                self.permuted).to(x.dtype)

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        scale = self.boft_s.view(-1).to(out.dtype)
        bias = base.bias
        return out * scale if bias is None else (out - bias) * scale + bias

    def rotation(self) -> torch.Tensor:
        """The dense M (in, in)."""
        return butterfly_matrix(self.blocks(dropout=False), self.perms)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return self.boft_s.to(weight_oi.dtype) * (weight_oi @ self.rotation().to(weight_oi.dtype).t())

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return (weight_oi / self.boft_s.to(weight_oi.dtype)) @ self.rotation().to(weight_oi.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}


register("BOFT", BOFTConfig, BOFTLayer,
         default_config=lambda target_modules, r=8: BOFTConfig(boft_block_size=r, boft_n_butterfly_factor=2,
                                                                target_modules=target_modules))
