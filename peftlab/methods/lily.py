"""Lily (arXiv 2407.09946): low-rank adapters interconnected across layers.

    z = A x                                   A: (r, in), shared by ``stride_A`` consecutive layers
    p = mean over the call's tokens of softmax(R z)         R: (num_B, r), the layer's own router
    h = W0 x + scaling * (sum_e p_e B_e)^T z  B: (num_B, r, out), the "HP" experts, shared by all layers of a group

A group is the targets with the same matched ``target_modules`` entry and the same (out, in) shape, in module order
(PEFT's rule): a list entry matches a module name it ends with (the longest one when several do; PEFT takes whichever
its set yields last), and a regex string puts every target in one group per shape. PEFT matches the entries it holds
after attaching: "all-linear" expands to the full names of the linears (a group each), and a list of 20 or more
entries is condensed to suffixes (here: last components), so a big "all-linear" groups by leaf name (``group_entries``).
Layer i of a group uses the A of layer (i // stride_A) * stride_A and the group's first layer's B. The router's
mixture is averaged over every token of the call (padding and other sequences of the batch included), as PEFT does, so
the update depends on the batch: not mergeable, not token-local. Init as PEFT, draw for draw (each target: three
throwaway nn.Linear draws, then A and R Kaiming-uniform, B zero, or Kaiming-uniform with ``init_weights=False``); so
the same seed gives PEFT's tensors.

Saved keys (PEFT's), per layer even where shared: ``lily_A.weight`` (r, in), ``lily_B.weight`` (num_B * r, out),
``lily_router.weight`` (num_B, r). Loading fills a shared tensor from each of its keys; core refuses a file whose keys
for one shared tensor differ (a file shared otherwise). PEFT adapts ``nn.Linear`` only; GPT-2's Conv1D works here too,
but such files load only in peftlab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError, check_number, check_one_of, check_positive_int
from peftlab.core.registry import register
from peftlab.ops import fast


@dataclass
class LilyConfig(AdapterConfig):
    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("stride_A", self.stride_A)
        check_positive_int("num_B", self.num_B)
        if self.num_B < 2:
            raise ConfigError(f"num_B must be at least 2 (the router mixes the B experts), got {self.num_B!r}")
        check_number("scaling", self.scaling)
        check_one_of("init_weights", self.init_weights, (True, False))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern needs layers_to_transform (PEFT's rule)")


# -- the maths ------------------------------------------------------------------------------------
def lily_delta(x: torch.Tensor, a: torch.Tensor, router: torch.Tensor, experts: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """scaling * (sum_e p_e B_e)^T (A x) for x (..., in), A (r, in), router (num_B, r), experts (num_B * r, out);
    p is the router's softmax averaged over all rows of x."""
    hidden = x @ a.t()
    num_b = router.shape[0]
    weights = torch.softmax(hidden @ router.t(), dim=-1).reshape(-1, num_b).mean(dim=0)
    combined = torch.einsum("e,eio->io", weights, experts.reshape(num_b, -1, experts.shape[1]))
    return (hidden @ combined) * scaling


def kaiming(*shape: int) -> torch.Tensor:
    """A tensor drawn as nn.Linear's default weight init (Kaiming-uniform, a = sqrt(5))."""
    out = torch.empty(shape)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5))
    return out


# PEFT condenses a target list this long to suffixes before matching (MIN_TARGET_MODULES_FOR_OPTIMIZATION)
_CONDENSED_FROM = 20


def group_entries(spec: list[str] | str | None, targets: list[str]) -> list[str] | str:
    """The ``target_modules`` entries PEFT groups by once it has attached: "all-linear" becomes the targets' full
    names, and a list of 20 or more entries their last components (PEFT's condensation, assuming no other module of
    the model ends with those names, as in the usual decoders)."""
    if isinstance(spec, str) and spec.lower() in ("all-linear", "all_linear"):
        spec = list(targets)
    if isinstance(spec, str) or len(spec or []) < _CONDENSED_FROM:
        return spec or []
    leaves = sorted({entry.rsplit(".", 1)[-1] for entry in spec})
    return leaves if len(leaves) < len(spec) else spec


def group_key(entries: list[str] | str, module_name: str) -> str:
    """The entry that groups ``module_name``: a regex string groups every target, a list the longest entry the name
    ends with (PEFT takes whichever its set yields last; the same unless entries overlap)."""
    if isinstance(entries, str):
        return entries
    return max((entry for entry in entries if module_name.endswith(entry)), key=len, default=module_name)


# -- modules --------------------------------------------------------------------------------------
class LilyShared(SharedTensors):
    """Every A and B of one Lily adapter (``lily_A`` / ``lily_B`` lists) and each target's index into them, plus the
    routers' initial values, drawn in PEFT's order. Nothing is saved at model level: each layer saves the A and B it
    uses under its own keys, as PEFT does."""

    def __init__(self, config: LilyConfig, views: dict[str, BaseView]):
        super().__init__()
        r, num_b = config.r, config.num_B
        self.lily_A, self.lily_B = nn.ParameterList(), nn.ParameterList()
        self.slots: dict[str, tuple[int, int]] = {}
        self.initial_routers: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[str]] = {}
        entries = group_entries(config.target_modules, list(views))
        for name, view in views.items():  # module order, as PEFT walks them
            position = groups.setdefault((group_key(entries, name), view.out_features, view.in_features), [])
            position.append(name)
            i = len(position) - 1
            b_shape = (num_b * r, view.out_features)
            kaiming(r, view.in_features), kaiming(*b_shape), kaiming(num_b, r)  # nn.Linear's own init, overwritten
            a, router = kaiming(r, view.in_features), kaiming(num_b, r)
            b = torch.zeros(b_shape) if config.init_weights else kaiming(*b_shape)
            if i % config.stride_A == 0:  # leads a block of stride_A layers: its A is kept
                self.lily_A.append(nn.Parameter(a))
            if i == 0:  # first of its group: its B is every member's
                self.lily_B.append(nn.Parameter(b))
            leader = position[i - i % config.stride_A]
            self.slots[name] = (self.slots[leader][0] if leader != name else len(self.lily_A) - 1,
                                self.slots[position[0]][1] if i else len(self.lily_B) - 1)
            self.initial_routers[name] = router


class LilyLayer(AdapterLayer):
    mergeable = False  # the experts' mixture depends on the batch
    token_local = False  # ... padding included

    def __init__(self, base: BaseView, config: LilyConfig, module_name: str, shared: LilyShared):
        super().__init__(base, config, module_name)
        self.shared, self.scaling = shared, config.scaling
        self.a_index, self.b_index = shared.slots[module_name]
        self.lily_router = nn.Parameter(shared.initial_routers.pop(module_name))
        self.identity_at_init = config.init_weights

    @property
    def lily_A(self) -> nn.Parameter:
        return self.shared.lily_A[self.a_index]

    @property
    def lily_B(self) -> nn.Parameter:
        return self.shared.lily_B[self.b_index]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(fast.compute_dtype(x, self.lily_A))
        a, router, experts = (t.to(x.device, x.dtype) for t in (self.lily_A, self.lily_router, self.lily_B))
        return lily_delta(x, a, router, experts, self.scaling)

    def adapter_params(self):
        return iter((self.lily_A, self.lily_B, self.lily_router))

    def param_roles(self) -> dict[str, str]:
        return {"lily_router": "A", f"shared.lily_A.{self.a_index}": "A", f"shared.lily_B.{self.b_index}": "B"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"lily_A.weight": self.lily_A, "lily_B.weight": self.lily_B, "lily_router.weight": self.lily_router}


def default_config(target_modules, r: int = 8) -> LilyConfig:
    """The paper's advice: a rank twice LoRA's, A shared by pairs of layers, as many experts as A blocks (two on
    the tiny test models)."""
    return LilyConfig(r=2 * r, stride_A=2, num_B=2, target_modules=target_modules)


# lr_scale: a LoRA-like pair (Kaiming A, zero B) whose B is shared by every layer of a group: LoRA's rate
register("LILY", LilyConfig, LilyLayer, make_shared=LilyShared, lr_scale=1.0, default_config=default_config)
