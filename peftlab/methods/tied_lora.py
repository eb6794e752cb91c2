"""Tied-LoRA (Renduchintala et al. 2024): low-rank pairs tied across layers, per-layer scaling vectors.

    h = W0 x + s diag(v) B diag(u) A dropout(x),    s = lora_alpha / r

A: (r, in), B: (out, r), u: (r,), v: (out,). The paper's variants differ in which of A and B are
tied (one tensor per targeted layer *shape*, shared by every layer of that shape, so q_proj of
every block uses the same A) and which of A, B, u, v are trained; both are selectable:

- ``tied_matrices``: the subset of ["A", "B"] shared across layers (default both); an untied
  matrix is a separate tensor per layer.
- ``trainable``: the subset of ["A", "B", "u", "v"] that is trained (default all); frozen
  matrices keep their random init, frozen vectors stay at 1. E.g. the paper's vBuA with frozen
  tied matrices is ``trainable=["u", "v"]``; plain LoRA-like tying is ``trainable=["A", "B"]``.

Init (``init_weights=True``): matrices Kaiming-uniform, vectors 1, except the first trainable of
v, u, B, A, which starts at 0 — so ΔW = 0 at init whatever the selection, and that tensor gets a
gradient at once. ``init_weights=False`` zeroes nothing (not identity; for tests).
Gradients of a tied tensor accumulate over every layer that uses it.

Not a PEFT method: peft_type "TIED_LORA". The checkpoint uses PEFT's layout: per layer
``base_model.model.<path>.tied_lora_u`` / ``tied_lora_v`` (and ``tied_lora_A`` / ``tied_lora_B``
when untied), tied matrices at model level, ``base_model.tied_lora_A.<out>x<in>``. Frozen
tensors are saved too, so a reload is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout
from peftlab.core.registry import register
from peftlab.ops import fast
from peftlab.ops.scaled_lowrank import scaled_lowrank, scaled_lowrank_weight


MATRICES = ("A", "B")
TENSORS = ("A", "B", "u", "v")


@dataclass
class TiedLoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_weights: bool = True
    tied_matrices: list = field(default_factory=lambda: list(MATRICES))
    trainable: list = field(default_factory=lambda: list(TENSORS))

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        check_dropout("lora_dropout", self.lora_dropout)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be a bool, got {self.init_weights!r}")
        for name, allowed in (("tied_matrices", MATRICES), ("trainable", TENSORS)):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not set(value) <= set(allowed) or len(set(value)) != len(value):
                raise ConfigError(f"{name} must be a list of distinct names from {list(allowed)}, got {value!r}")
        if not self.trainable:
            raise ConfigError("trainable is empty: at least one of A, B, u, v must be trained")

    def zero_init(self) -> str | None:
        """The tensor that starts at 0 so that ΔW = 0: the first trained of v, u, B, A."""
        if not self.init_weights:
            return None
        return next(t for t in ("v", "u", "B", "A") if t in self.trainable)


def shape_key(view: BaseView) -> str:
    return f"{view.out_features}x{view.in_features}"


def new_matrix(config: TiedLoraConfig, which: str, rows: int, cols: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(rows, cols), requires_grad=which in config.trainable)
    if config.zero_init() == which:
        nn.init.zeros_(p)
    else:
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


def new_vector(config: TiedLoraConfig, which: str, size: int) -> nn.Parameter:
    value = torch.zeros(size) if config.zero_init() == which else torch.ones(size)
    return nn.Parameter(value, requires_grad=which in config.trainable)


def matrix_shape(which: str, view: BaseView, r: int) -> tuple[int, int]:
    return (r, view.in_features) if which == "A" else (view.out_features, r)


class TiedPairs(SharedTensors):
    """The tied matrices of one adapter, one per targeted layer shape: A (r, in), B (out, r)."""

    def __init__(self, config: TiedLoraConfig, views: dict[str, BaseView]):
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, view in sorted({shape_key(v): v for v in views.values() if v.kind == "linear"}.items()):
            for which in config.tied_matrices:
                getattr(self, f"lora_{which}")[key] = new_matrix(config, which, *matrix_shape(which, view, config.r))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"tied_lora_A.{k}": p for k, p in self.lora_A.items()}
        out.update({f"tied_lora_B.{k}": p for k, p in self.lora_B.items()})
        return out


class TiedLoraLayer(AdapterLayer):
    recomputes_pointwise = True  # 1B, H100: 0.82x the peak at 1.01x the time

    def __init__(self, base: BaseView, config: TiedLoraConfig, module_name: str, shared: TiedPairs):
        super().__init__(base, config, module_name)
        self.shared = shared
        self.in_features, self.out_features = base.in_features, base.out_features
        self.key = shape_key(base)
        self.scaling = config.lora_alpha / config.r
        self.trainable = tuple(config.trainable)
        self.tied_lora_u = new_vector(config, "u", config.r)
        self.tied_lora_v = new_vector(config, "v", base.out_features)
        for which in MATRICES:
            if which not in config.tied_matrices:
                setattr(self, f"tied_lora_{which}", new_matrix(config, which, *matrix_shape(which, base, config.r)))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def _matrix(self, which: str) -> nn.Parameter:
        own = self._parameters.get(f"tied_lora_{which}")
        return own if own is not None else getattr(self.shared, f"lora_{which}")[self.key]

    @property
    def A(self) -> nn.Parameter:
        return self._matrix("A")

    @property
    def B(self) -> nn.Parameter:
        return self._matrix("B")

    def adapter_params(self):
        """Only the selected ``trainable`` tensors: set_active must not unfreeze the others."""
        return (p for name, p in self.named_parameters()
                if name.replace("shared.lora_", "tied_lora_")[len("tied_lora_")] in self.trainable)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_lowrank(self.dropout(x), self.A, self.B, self.tied_lora_u, self.tied_lora_v) * self.scaling

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        return fast.scaled_lowrank(x, base, self.A, self.B, self.tied_lora_u, self.tied_lora_v, self.scaling,
                                   self.dropout)

    def delta_weight(self) -> torch.Tensor:
        return scaled_lowrank_weight(self.A, self.B, self.tied_lora_u, self.tied_lora_v) * self.scaling

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # tied A, B are saved once, at model level, by TiedPairs
        return {name: p for name, p in self._parameters.items() if name.startswith("tied_lora_")}

    def param_roles(self) -> dict[str, str]:
        roles = {name: "A" for name, _ in self.named_parameters()}
        roles.update({f"shared.lora_B.{k}": "B" for k in self.shared.lora_B})
        roles.update({name: "B" for name in ("tied_lora_v", "tied_lora_B") if name in self._parameters})
        return roles


register("TIED_LORA", TiedLoraConfig, TiedLoraLayer, make_shared=TiedPairs,
         default_config=lambda target_modules, r=8: TiedLoraConfig(r=r, lora_alpha=2 * r,
                                                                   target_modules=target_modules))
