"""C3A (Chen et al. 2024): the update is a block-circulant matrix, applied as circular correlations by FFT.

    h = W0 x + ΔW x,    ΔW = C / in,    C = [C_ij] (m x n blocks of b x b),    C_ij[s, t] = w_ij[(t - s) mod b]

b = ``block_size`` must divide in and out (m = out / b, n = in / b); ``c3a_kernel`` (m, n, b) holds one length-b
vector per block (float32 over half-precision bases, like every adapter here; the FFTs run in float32). The
reference forward never forms ΔW: ``ops.spectral.block_circular_correlation`` applies it by real FFTs, O(m n b) per
token plus the FFTs, where ΔW x costs O(m n b^2). The fast path (CUDA) forms it anyway, once a step by a gather (as
merging does), and runs one GEMM on W0 + ΔW (``fast.dense_update``): more arithmetic, but on tensor cores, where the
FFT path's (tokens, n) x (n, m) complex products per frequency are small and memory-bound. Init (PEFT's
``init_weights``): True gives w = 0 (the base at init); "xavier_uniform" (PEFT's default) and False draw U(-a, a),
a = sqrt(6 / (in + out)); "kaiming_uniform" draws U(-1/sqrt(in), 1/sqrt(in)); "gaussian" N(0, 1).
``block_size_pattern`` sets b per module by PEFT's rule for this method. PEFT adapts ``nn.Linear`` only; GPT-2's
Conv1D is adapted here too (as a linear).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_positive_int, dict_field
from peftlab.core.registry import register
from peftlab.methods._dense import DenseUpdateLayer
from peftlab.methods.fourierft import pattern_lookup
from peftlab.ops.spectral import block_circulant_weight, block_circular_correlation

_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass
class C3AConfig(AdapterConfig):
    block_size: int = 256
    bias: str = "none"
    block_size_pattern: dict = dict_field()
    init_weights: bool | str = "xavier_uniform"

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_positive_int("block_size", self.block_size)
        for key, value in self.block_size_pattern.items():
            check_positive_int(f"block_size_pattern[{key!r}]", value)
        if self.init_weights not in _INITS or not isinstance(self.init_weights, (bool, str)):
            raise ConfigError(f"init_weights must be one of {list(_INITS)}, got {self.init_weights!r}")
        check_bias(self.bias, "c3a_only")


def c3a_init_(kernel: torch.Tensor, init, in_features: int, out_features: int) -> None:
    """Fill ``kernel`` in place by PEFT's C3A ``init_weights`` rule (one draw from the global generator)."""
    if init is True:
        nn.init.zeros_(kernel)
    elif init == "gaussian":
        nn.init.normal_(kernel)
    elif init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(kernel, -bound, bound)
    else:  # "xavier_uniform" or False
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
        nn.init.uniform_(kernel, -bound, bound)


class C3ALayer(DenseUpdateLayer):
    """``delta`` by FFT (the reference path, PEFT's numerics); on the fast path ``DenseUpdateLayer``'s one GEMM on
    W0 + ΔW with ΔW gathered from the kernel (the FFT path's small per-frequency complex products ran at a quarter of
    LoRA's speed on an H100: 238.5 ms a 1B step, twentieth session)."""

    def __init__(self, base: BaseView, config: C3AConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.in_features, self.out_features = base.in_features, base.out_features
        b = pattern_lookup(config.block_size_pattern, module_name, config.block_size)
        for side, size in (("input", self.in_features), ("output", self.out_features)):
            if size % b:
                raise ConfigError(f"C3A on {module_name!r}: block_size={b} must divide the {side} size {size} "
                                  f"(in={self.in_features}, out={self.out_features})")
        self.c3a_kernel = nn.Parameter(torch.empty(self.out_features // b, self.in_features // b, b))
        c3a_init_(self.c3a_kernel, config.init_weights, self.in_features, self.out_features)
        self.identity_at_init = config.init_weights is True

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return block_circular_correlation(x, self.c3a_kernel) / self.in_features

    def delta_weight(self) -> torch.Tensor:
        return block_circulant_weight(self.c3a_kernel) / self.in_features


# lr_scale: each kernel entry reaches b entries of ΔW scaled by 1 / in, so a step moves ΔW's entries by lr / in,
# about 1 / sqrt(r * in) of a rank-r LoRA step (1/11 on the tiny test models, 1/64 at in = 512)
register("C3A", C3AConfig, C3ALayer, lr_scale=50.0,
         default_config=lambda target_modules, r=8: C3AConfig(block_size=4 * r, target_modules=target_modules))
