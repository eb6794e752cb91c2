"""DEFT (decompositional efficient fine-tuning): a rank-r subspace of the weight's output removed and re-injected.

    W' = (I - P_proj) W0 + s Q_P R = W0 + Q_P (s R - right^T W0),    s = alpha / r (1 without alpha)
    relu: Q_P = P, right = relu(P) (P_proj = P relu(P)^T);    qr: Q_P = qr(P).Q, right = Q_P (orthogonal projector)
    h = W' x + b = W0 x + b - Q_P (right^T (W0 x)) + s Q_P (R dropout(x))

``deft_P`` (out, r) and ``deft_R`` (r, in), r capped at out_features as PEFT does; with ``para`` (PaRa) there is no R
and the update is the pure removal -P_proj W0. The projection is computed in float32 and applied in
``fast.compute_dtype`` (the activations' dtype on the fast path: bf16 products on a bf16 model, where the removal
and the re-injection at init cancel to bf16 rounding rather than exactly; float32 elsewhere). Saved keys, as PEFT's:
``deft_P``, ``deft_R``. Init as PEFT: P ~ N(0, 0.02) (one draw per layer, in module order), then R = right^T W0 / s,
so the adapted layer equals the base (``init_weights=False``: R ~ N(0, 0.02 init_scale), not the identity; PaRa is
never the identity). The removal term acts on the output it is given minus the bias, i.e. on W0 x when DEFT is the
module's first adapter (PEFT's reuse of the base product). Merging keeps right^T W of the weight it merges into
(r, in), so unmerge subtracts exactly what merge added although (I - P_proj) is not invertible.

Several DEFT adapters active on one module compose: each removes its subspace from what the previous one gave, which
is what core's merge one after another gives too. PEFT's forward instead sums their updates against W0 (its merge
does the same), so with two or more active at once the outputs differ from PEFT's; one adapter is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import (
    AdapterConfig, ConfigError, check_bias, check_dropout, check_number, check_one_of, check_positive_int,
)
from peftlab.core.registry import register
from peftlab.ops import fast


@dataclass
class DeftConfig(AdapterConfig):
    r: int = 8
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: int | None = None
    para: bool = False
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    deft_dropout: float = 0.0
    init_weights: bool = True
    bias: str = "none"

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_one_of("decomposition_method", self.decomposition_method, ("relu", "qr"))
        check_number("init_scale", self.init_scale)
        if self.alpha is not None:
            check_number("alpha", self.alpha)
        for name in ("para", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_dropout("deft_dropout", self.deft_dropout)
        check_bias(self.bias, "deft_only")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError("layers_to_transform / layers_pattern cannot be used when target_modules is a regex "
                              f"string ({self.target_modules!r})")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform")


def deft_projection(p: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_P, right) in float32, with P_proj = Q_P right^T."""
    p = p.float()
    if method == "qr":
        q = torch.linalg.qr(p)[0]
        return q, q
    return p, torch.relu(p)


def deft_delta(q: torch.Tensor, factor: torch.Tensor, injection: torch.Tensor | None) -> torch.Tensor:
    """The weight update (out, in) from Q_P, factor = right^T W0 (r, in) and s R (None with PaRa)."""
    return -(q @ factor) if injection is None else q @ (injection - factor)


class DeftLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: DeftConfig, module_name: str):
        super().__init__(base, config, module_name)
        r = min(config.r, base.out_features)
        self.method, self.para = config.decomposition_method, config.para
        self.scaling = config.alpha / r if config.alpha else 1.0
        self.dropout = nn.Dropout(config.deft_dropout) if config.deft_dropout > 0 else nn.Identity()
        self.deft_P = nn.Parameter(torch.empty(base.out_features, r))
        nn.init.normal_(self.deft_P, mean=0.0, std=0.02)
        self.identity_at_init = config.init_weights and not config.para
        self._merged_factor: torch.Tensor | None = None  # right^T W0 of the unmerged weight, while merged
        if config.para:
            return
        self.deft_R = nn.Parameter(torch.empty(r, base.in_features))
        weight = base.weight_oi()
        if not config.init_weights:
            nn.init.normal_(self.deft_R, mean=0.0, std=0.02 * config.init_scale)
        elif not weight.is_meta:  # R = right^T W0 / s: no update at init
            with torch.no_grad():
                right = deft_projection(self.deft_P, self.method)[1]
                self.deft_R.copy_(right.t() @ weight.detach().float() / self.scaling)

    def _injection(self) -> torch.Tensor | None:
        return None if self.para else self.deft_R.float() * self.scaling

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        q, right = deft_projection(self.deft_P, self.method)
        dtype = fast.compute_dtype(x, q.float())  # fp32 on the reference path, the activations' on the fast one
        q, right = q.to(dtype), right.to(dtype)
        result = out.to(dtype)
        product = result if base.bias is None else result - base.bias.to(dtype)  # W0 x (see the module docstring)
        result = result - (product @ right) @ q.t()
        if not self.para:
            result = result + (self.dropout(x.to(dtype)) @ self._injection().t().to(dtype)) @ q.t()
        return result.to(out.dtype)

    def _delta(self, factor: torch.Tensor) -> torch.Tensor:
        return deft_delta(deft_projection(self.deft_P, self.method)[0], factor, self._injection())

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        right = deft_projection(self.deft_P, self.method)[1]
        self._merged_factor = right.t() @ weight_oi.float()
        return weight_oi + self._delta(self._merged_factor).to(weight_oi.dtype)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        factor, self._merged_factor = self._merged_factor, None
        return weight_oi - self._delta(factor).to(weight_oi.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"deft_P": self.deft_P} if self.para else {"deft_P": self.deft_P, "deft_R": self.deft_R}

    def param_roles(self) -> dict[str, str]:
        return {"deft_P": "B", "deft_R": "A"} if not self.para else {"deft_P": "B"}


# lr_scale: LoRA's: P (N(0, 0.02)) and R are a rank-r pair on the output side, trained like LoRA's B and A
register("DEFT", DeftConfig, DeftLayer, lr_scale=1.0,
         default_config=lambda target_modules, r=8: DeftConfig(r=r, target_modules=target_modules))
