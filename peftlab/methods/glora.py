"""GLoRA (Chavan et al. 2023): generalised LoRA, five learned paths A..E around the frozen weight and bias.

    W' = W0 + W0 ⊙ A + B,   b' = b0 + b0 ⊙ D + E + W0 C
    h = W' x + b' = W0 x + b0 + (W0 ⊙ A + B) x + (b0 ⊙ D + E + W0 C)

Each path is parameterised by the config (``config_A_B`` for A and B, ``config_C``, ``config_D_E`` for D and E):
"lora" Xd Xu (A, B: (out, r) (r, in); C: (in, r) (r, 1)), "vector" X ((out, 1) for A / B, (in, 1) for C, (out,) for
D / E), "constant" X (1,) (a scalar), "none" a frozen zero buffer ``zeros`` of the path's full shape. C, D and E act
on the bias only, so on a layer without one they are "none" whatever the config says. Saved keys, as PEFT's:
``glora_<P>.Xd`` / ``glora_<P>.Xu`` / ``glora_<P>.X`` / ``glora_<P>.zeros`` for P in A..E.

Init as PEFT, path by path in the order A, B, C, D, E: lora Xu Kaiming-uniform and Xd zero, vector and constant
zero, so the layer starts as the base; ``init_weights=False`` draws Xd and vectors Kaiming-uniform and constants
N(0, 0.02). Mergeable: merge writes W' and b' (the bias term W0 C read from the weight before the merge); unmerge
solves W0 = (W' - B) / (1 + A), b0 = (b' - E - W0 C) / (1 + D). PEFT adapts plain nn.Linear only; GPT-2's Conv1D is
adapted here through its (out, in) view too.

Several GLoRA adapters active on one module add their updates against the weight they find (W0 when none is merged),
as PEFT's forward does. Core merges adapters one after another, so a second one's W ⊙ A reads the first's merged
weight; PEFT instead re-merges all of them from W0. Merged together, two adapters therefore differ from their
unmerged forward (and from PEFT) by W0 ⊙ A_1 ⊙ A_2 + B_1 ⊙ A_2; one merged adapter is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_one_of, check_positive_int
from peftlab.core.registry import register
from peftlab.methods._lycoris import kaiming_
from peftlab.ops import fast

A_B_FORMS = ("lora", "vector", "constant", "none")
C_FORMS = ("lora", "vector", "none")
D_E_FORMS = ("vector", "constant", "none")


@dataclass
class GloraConfig(AdapterConfig):
    r: int = 8
    bias: str = "none"
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_one_of("bias", self.bias, ("none", "all", "glora_only"))
        check_one_of("config_A_B", self.config_A_B, A_B_FORMS)
        check_one_of("config_C", self.config_C, C_FORMS)
        check_one_of("config_D_E", self.config_D_E, D_E_FORMS)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be a bool, got {self.init_weights!r}")


class GloraPath(nn.Module):
    """One of A..E: ``value()`` is the path's tensor (a scalar for "constant"), broadcast against W0 or b0."""

    def __init__(self, form: str, rows: int, cols: int | None, r: int, zero_init: bool):
        """``cols`` None: a bias-shaped path (D, E), whose vector is (rows,) and whose "none" buffer is too."""
        super().__init__()
        self.form = form
        full = (rows,) if cols is None else (rows, cols)
        if form == "lora":
            self.Xd = nn.Parameter(torch.zeros(rows, r))
            self.Xu = nn.Parameter(kaiming_(torch.empty(r, cols)))
            if not zero_init:
                kaiming_(self.Xd.data)
        elif form == "vector":
            self.X = nn.Parameter(torch.zeros((rows,) if cols is None else (rows, 1)))
            if not zero_init:  # PEFT's Kaiming on the (rows, 1) column, or on the (1, rows) view of a (rows,) vector
                kaiming_(self.X.data.unsqueeze(0) if cols is None else self.X.data)
        elif form == "constant":
            self.X = nn.Parameter(torch.zeros(1))
            if not zero_init:
                nn.init.normal_(self.X.data, mean=0.0, std=0.02)
        else:
            self.register_buffer("zeros", torch.zeros(full))

    def value(self) -> torch.Tensor:
        if self.form == "lora":
            return self.Xd @ self.Xu
        if self.form == "constant":
            return self.X[0]
        return self.X if self.form == "vector" else self.zeros


def glora_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W0 ⊙ A + B: the weight update (out, in)."""
    return w0 * a + b


def glora_bias(w0: torch.Tensor, b0: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """b0 ⊙ D + E + W0 C: the bias update (out,)."""
    return b0 * d + e + (w0 @ c).squeeze(-1)


class GloraLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: GloraConfig, module_name: str):
        super().__init__(base, config, module_name)
        out_f, in_f, r, zero = base.out_features, base.in_features, config.r, config.init_weights
        has_bias = base.bias is not None
        self.glora_A = GloraPath(config.config_A_B, out_f, in_f, r, zero)
        self.glora_B = GloraPath(config.config_A_B, out_f, in_f, r, zero)
        self.glora_C = GloraPath(config.config_C if has_bias else "none", in_f, 1, r, zero)
        self.glora_D = GloraPath(config.config_D_E if has_bias else "none", out_f, None, r, zero)
        self.glora_E = GloraPath(config.config_D_E if has_bias else "none", out_f, None, r, zero)
        self.identity_at_init = zero
        self._bias_shift: torch.Tensor | None = None  # W0 C of the unmerged weight, between a weight and a bias fold

    def _updates(self, x: torch.Tensor, base: BaseView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 ⊙ A + B, the bias update or None without a bias) in the compute dtype (``fast.compute_dtype``: the
        activations' on the fast path, so a bf16 model runs bf16 GEMMs rather than fp32 ones of the whole weight)."""
        a = self.glora_A.value()
        dtype = fast.compute_dtype(x, a)
        w0 = base.weight_oi().to(dtype)
        weight = glora_weight(w0, a.to(dtype), self.glora_B.value().to(dtype))
        if base.bias is None:
            return weight, None
        return weight, glora_bias(w0, base.bias.to(dtype), self.glora_C.value().to(dtype),
                                  self.glora_D.value().to(dtype), self.glora_E.value().to(dtype))

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        weight, bias = self._updates(x, base)
        delta = base.linear(x.to(weight.dtype), weight)
        return out + (delta if bias is None else delta + bias).to(out.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """One GEMM on W0 + (W0 ⊙ A + B) (``fast.dense_update``), the bias update added to its output."""
        if not fast.enabled(x):
            return None
        weight, bias = self._updates(x, base)
        out = fast.dense_update(x, base, weight)
        return out if out is None or bias is None else out + bias.to(out.dtype)

    def _keep_bias_shift(self, w0: torch.Tensor, base: BaseView) -> None:
        """W0 C from the unmerged weight, for the bias fold that core runs right after the weight's."""
        if base.bias is not None:
            self._bias_shift = (w0 @ self.glora_C.value().to(w0.dtype)).squeeze(-1)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        self._keep_bias_shift(weight_oi, base)
        return weight_oi + glora_weight(weight_oi, self.glora_A.value(), self.glora_B.value()).to(weight_oi.dtype)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        w0 = (weight_oi - self.glora_B.value()) / (1.0 + self.glora_A.value())
        self._keep_bias_shift(w0, base)
        return w0.to(weight_oi.dtype)

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        shift, self._bias_shift = self._bias_shift, None
        return bias + bias * self.glora_D.value() + self.glora_E.value() + shift

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        shift, self._bias_shift = self._bias_shift, None
        return (bias - self.glora_E.value() - shift) / (1.0 + self.glora_D.value())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self.state_dict(keep_vars=True).items() if name.startswith("glora_")}


# lr_scale: LoRA's: the default (lora A and B) paths are rank-r pairs with LoRA's init
register("GLORA", GloraConfig, GloraLayer, lr_scale=1.0,
         default_config=lambda target_modules, r=8: GloraConfig(r=r, target_modules=target_modules))
