"""(IA)^3 (Liu et al. 2022): learned rescaling of activations.

    attention-like targets:  h = l ⊙ (W0 x + b0)          l: (out,), scales the output
    feedforward targets:     h = W0 (l ⊙ x) + b0           l: (in,),  scales the input

``l`` starts at ones, so the adapted model equals the base at init. Merging folds ``l`` into the
weight (columns for feedforward targets, rows and the bias otherwise); unmerging divides it out,
which needs every entry of ``l`` to be non-zero. PEFT stores ``l`` as ``ia3_l`` shaped (1, in) for
feedforward targets and (out, 1) otherwise; ours has the same shapes and keys. A target is
feedforward when its name ends with an entry of ``feedforward_modules`` (plain suffix, as PEFT) or
fully matches it when it is a regex string.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView, ServingForm
from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.registry import register
from peftlab.ops import fast

# Down-projections of common architectures (the paper's feedforward scaling), for ``default_config``.
_FEEDFORWARD_NAMES = ("down_proj", "mlp.c_proj", "dense_4h_to_h", "fc2", "wo")


@dataclass
class IA3Config(AdapterConfig):
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    init_ia3_weights: bool = True

    peft_absent_fields = frozenset({"layers_to_transform", "layers_pattern"})

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        super().__post_init__()

    def validate(self) -> None:
        ff, targets = self.feedforward_modules, self.target_modules
        if ff is not None and not isinstance(ff, (str, list)):
            raise ConfigError(f"feedforward_modules must be a list of names or a regex string, got {ff!r}")
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(
                f"feedforward_modules must be a subset of target_modules; not targeted: {sorted(set(ff) - set(targets))}"
            )
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be a bool, got {self.init_ia3_weights!r}")

    def is_feedforward(self, module_name: str) -> bool:
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(key) for key in ff)


class IA3Layer(AdapterLayer):
    """One (IA)^3 vector; ``transforms_input`` is set per layer (feedforward targets scale the input)."""

    batched_serving = True
    serves_from_state = True

    def __init__(self, base: BaseView, config: IA3Config, module_name: str):
        super().__init__(base, config, module_name)
        self.transforms_input = config.is_feedforward(module_name)
        shape = self.state_shapes(base, config, module_name)["ia3_l"]
        self.ia3_l = nn.Parameter(torch.ones(shape) if config.init_ia3_weights else torch.randn(shape))

    @classmethod
    def state_shapes(cls, base: BaseView, config: IA3Config, module_name: str) -> dict[str, tuple[int, ...]]:
        # PEFT's shapes: (1, in) scales a feedforward target's input, (out, 1) any other target's output
        return {"ia3_l": (1, base.in_features) if config.is_feedforward(module_name) else (base.out_features, 1)}

    @classmethod
    def serving_form_from_state(cls, state, base: BaseView, config: IA3Config, module_name: str) -> ServingForm:
        return _serving_form(state["ia3_l"].flatten(), config.is_feedforward(module_name))

    @property
    def scale(self) -> torch.Tensor:
        return self.ia3_l.flatten()

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.ia3_l)
        return (x.to(dtype) * self.scale.to(dtype)).to(x.dtype)

    def input_scale(self) -> torch.Tensor | None:
        return self.scale if self.transforms_input else None

    def output_scale(self) -> torch.Tensor | None:
        return None if self.transforms_input else self.scale

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self.transforms_input:
            return out
        dtype = fast.compute_dtype(out, self.ia3_l)
        return (out.to(dtype) * self.scale.to(dtype)).to(out.dtype)

    def serving_form(self, base: BaseView) -> ServingForm:
        return _serving_form(self.scale.detach(), self.transforms_input)

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError(f"IA3 on {self.module_name!r} rescales the base weight; it has no additive delta_weight")

    def _weight_factor(self) -> torch.Tensor:
        return self.scale[None, :] if self.transforms_input else self.scale[:, None]

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return weight_oi * self._weight_factor().detach().to(weight_oi.dtype)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return weight_oi / self._nonzero_factor(self._weight_factor()).to(weight_oi.dtype)

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.transforms_input else bias * self.scale.detach().to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.transforms_input else bias / self._nonzero_factor(self.scale).to(bias.dtype)

    def _nonzero_factor(self, factor: torch.Tensor) -> torch.Tensor:
        factor = factor.detach()
        if bool((factor == 0).any()):
            raise AdapterError(f"IA3 on {self.module_name!r}: a scale is exactly 0, so the merge cannot be undone")
        return factor


def _serving_form(scale: torch.Tensor, transforms_input: bool) -> ServingForm:
    """The input scale of a feedforward target, else the output (and bias) scale."""
    return ServingForm(in_scale=scale) if transforms_input else ServingForm(out_scale=scale, scale_bias=True)


def _default_config(target_modules, r: int = 8) -> IA3Config:
    if isinstance(target_modules, str):
        ff: list[str] | str = rf".*\.({'|'.join(re.escape(n) for n in _FEEDFORWARD_NAMES)})"
    else:
        ff = [t for t in target_modules if any(t.endswith(n) for n in _FEEDFORWARD_NAMES)]
    return IA3Config(target_modules=target_modules, feedforward_modules=ff)


register("IA3", IA3Config, IA3Layer, default_config=_default_config, lr_scale=30.0)
