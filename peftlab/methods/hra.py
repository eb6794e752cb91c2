"""HRA (Yuan et al. 2024): a chain of r Householder reflections applied to the weight.

    W' = W0 H,   H = H_0 H_1 ... H_{r-1},   H_i = I - 2 u_i u_i^T / ||u_i||^2
    h = W' x + b = W0 (H^T x) + b

``hra_u``: (in, r), one column per reflection. With ``apply_GS`` the columns are first made
orthonormal by Gram-Schmidt (U) and H = I - 2 U U^T. PEFT's default init draws r/2 Kaiming columns
and repeats each one, so the reflections cancel in pairs (H_{2k} H_{2k+1} = I) and the layer starts
as the base; with r odd (or ``init_weights=False``, or GS) it is not the identity at init.
The reflections act on activations (``transforms_input``) in the compact WY form of the chain,
H = I - U T U^T with T (r, r) upper triangular (``ops.factored.householder_wy``), so x H^T =
x - ((x U) T^T) U^T: two thin (tokens, in) x (in, r) products, instead of PEFT's dense (in, in)
product per forward or r sequential passes over the activations.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_bias
from peftlab.core.registry import register
from peftlab.ops import fast
from peftlab.ops.factored import householder_apply, householder_wy


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns from the columns of u (in, r), in order, as PEFT computes them."""
    basis = []
    for i in range(u.shape[1]):
        col = u[:, i]
        for q in basis:
            col = col - (q @ col) * q
        basis.append(col / col.norm())
    return torch.stack(basis, dim=1)


@dataclass
class HRAConfig(AdapterConfig):
    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: str = "none"

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        check_bias(self.bias, "hra_only")


_NO_DROPOUT = nn.Identity()  # HRA has no dropout; the fused node is told so


class HRALayer(AdapterLayer):
    transforms_input = True
    recomputes_pointwise = True  # 1B, H100: 0.82x the peak at 1.03x the time

    def __init__(self, base: BaseView, config: HRAConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.r, self.apply_GS = config.r, config.apply_GS
        if self.apply_GS and self.r > base.in_features:
            raise ConfigError(f"HRA on {module_name!r}: apply_GS needs r <= in_features, got r={self.r} > "
                              f"{base.in_features} (Gram-Schmidt runs out of directions)")
        paired = config.init_weights and self.r % 2 == 0
        if config.init_weights and not paired:
            warnings.warn(f"HRA on {module_name!r}: r={self.r} is odd, so the paired (identity) init is impossible; "
                          "using a random init as PEFT does", stacklevel=2)
        half = torch.empty(base.in_features, self.r // 2 if paired else self.r)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        self.hra_u = nn.Parameter(torch.repeat_interleave(half, 2, dim=1) if paired else half)
        self.identity_at_init = paired and not self.apply_GS

    def _reflect_rows(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """x H^T (transpose=True) or x H, for row vectors x (..., in)."""
        if self.apply_GS:  # H = I - 2 U U^T with orthonormal U, symmetric
            units = gram_schmidt(self.hra_u).to(x.dtype)
            return x - 2 * (x @ units) @ units.t()
        wy = householder_wy(self.hra_u.float())  # fp32 on every device (a triangular solve above r 16)
        return householder_apply(x, self.hra_u.to(x.dtype), wy.to(x.dtype), transpose)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._reflect_rows(x.to(fast.compute_dtype(x, self.hra_u)), transpose=True).to(x.dtype)

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        return out  # all of HRA's effect is in transform_input

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """W0 (x H^T) = W0 x - (W0 U) T (U^T x): HRA as the fused rank-r LoRA node with A = U^T, B = -(W0 U) T (with
        Gram-Schmidt: A = Q^T, B = -2 W0 Q), so no rotated copy of the input is made and kept per layer; U gets its
        gradient through both factors. W0 U costs (out x in x r) per step, small beside the tokens' products."""
        if base.codec is not None or base.kind != "linear" or not fast.enabled(x):
            return None  # a quantized base would have to be dequantized for W0 U: the reference path
        weight = base.weight_oi()
        if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
            return None  # (fast.lowrank refuses the rest, e.g. mixed dtypes without autocast)
        if self.apply_GS:
            units = gram_schmidt(self.hra_u)
            a, b = units.t(), -2 * (weight @ units.to(weight.dtype)).float()
        else:
            a = self.hra_u.t()
            b = -(weight @ self.hra_u.to(weight.dtype)).float() @ householder_wy(self.hra_u.float())
        return fast.lowrank(x, base, a, b, 1.0, _NO_DROPOUT)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return self._reflect_rows(weight_oi, transpose=False)  # rows of W times H

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return self._reflect_rows(weight_oi, transpose=True)  # H is orthogonal: H^{-1} = H^T

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"hra_u": self.hra_u}


# lr_scale: only the direction of each Kaiming-initialised u matters, and LoRA-sized steps barely turn it
register("HRA", HRAConfig, HRALayer, lr_scale=5.0,
         default_config=lambda target_modules, r=8: HRAConfig(r=r, target_modules=target_modules))
