"""Adapters on a module's ``nn.Parameter`` itself (PEFT's ``target_parameters``): 3-D MoE expert stacks such as
transformers 5's ``experts.gate_up_proj`` (num_experts, out, in), or any 2-D weight (out, in).

``AdaptedParams`` replaces the module that owns the targeted parameters (the experts block) and is an
``AdaptedModule`` to core: activation, freezing, saving, deletion, merge and unload go through the same code. Its
forward runs the base module with each targeted parameter replaced by its merged value,

    W' = merge_into(W)   (LoRA: W_e + s B_e A_e for each expert e)

through ``torch.func.functional_call``, so the module's own forward (whatever experts kernel it dispatches to) does
the rest; merging writes the same W' into the parameter, so a merged forward equals the unmerged one bit for bit.
Each parameter is seen through a ``ParamView`` as a stack of (out, in) matrices, whatever its storage order
(``is_transposed`` experts store (num_experts, in, out), as PEFT reads them); the layer on it is the method's
``param_layer`` (an ``AdapterLayer`` with ``supported_kinds`` {"parameter"}, whose ``merge_into`` and
``delta_weight`` work on (num_experts, out, in)). One adapter's layers on one module are kept together in a
``ParamAdapters``, which saves them at PEFT's keys: PEFT nests one wrapper per parameter, the parameter registered
first innermost, so its tensors sit under ``base_layer.`` once per parameter wrapped after it
(``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s, ``experts.lora_A.weight`` is ``down_proj``'s).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.func import functional_call

from .adapter import AdaptedModule, AdapterError, AdapterLayer, ModulesToSave, sum_present
from .config import ConfigError


class ParamView:
    """One parameter of a module as (num_experts, out, in); a 2-D (out, in) weight is one expert."""

    kind = "parameter"

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        shape = tuple(getattr(module, name).shape)
        self.transposed = len(shape) == 3 and bool(getattr(module, "is_transposed", False))
        if len(shape) == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, shape
        elif len(shape) == 3:
            self.num_experts, out_f, in_f = shape
            self.out_features, self.in_features = (in_f, out_f) if self.transposed else (out_f, in_f)
        else:
            raise AdapterError(f"parameter {name!r} has shape {shape}; target_parameters adapts 2-D (out, in) and "
                               "3-D (num_experts, out, in) parameters")

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def weight_oi(self, stored: torch.Tensor | None = None) -> torch.Tensor:
        """``stored`` (default: the parameter) as (num_experts, out, in), a view."""
        w = self.weight if stored is None else stored
        if w.dim() == 2:
            return w.unsqueeze(0)
        return w.transpose(1, 2) if self.transposed else w

    def stored(self, value: torch.Tensor) -> torch.Tensor:
        """(num_experts, out, in) ``value`` in the parameter's own layout and dtype."""
        value = value.to(self.weight.dtype)
        if self.weight.dim() == 2:
            return value.squeeze(0)
        return value.transpose(1, 2) if self.transposed else value

    def set_weight_oi(self, value: torch.Tensor) -> None:
        self.weight.data.copy_(self.stored(value))

    def adapter_dtype(self) -> torch.dtype:
        dtype = self.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class ParamViews:
    """The ``view`` of an ``AdaptedParams``: a ``ParamView`` per targeted parameter of the module; no bias."""

    kind = "parameters"
    bias = None
    codec = None
    transposed = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.params: dict[str, ParamView] = {}

    def of(self, name: str) -> ParamView:
        if name not in self.params:
            self.params[name] = ParamView(self.module, name)
        return self.params[name]


class ParamAdapters(AdapterLayer):
    """One adapter's layers (by parameter name) on one module; saved at PEFT's nested keys."""

    supported_kinds = frozenset({"parameters"})
    compiles_in_layers = False  # functional_call inside a compiled decoder layer is not tested: stay eager

    def __init__(self, views: ParamViews, layers: dict[str, AdapterLayer], module_name: str):
        super().__init__(views, None, module_name)
        self.layers = nn.ModuleDict(layers)
        order = [n for n, _ in views.module.named_parameters(recurse=False) if n in layers]
        self.prefix = {n: "base_layer." * (len(order) - 1 - i) for i, n in enumerate(order)}
        self.mergeable = all(layer.mergeable for layer in layers.values())
        self.identity_at_init = all(layer.identity_at_init for layer in layers.values())

    def adapter_params(self):
        return itertools.chain.from_iterable(layer.adapter_params() for layer in self.layers.values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {self.prefix[n] + key: t for n, layer in self.layers.items() for key, t in layer.state_tensors().items()}

    def param_roles(self) -> dict[str, str]:
        return {f"layers.{n}.{key}": role for n, layer in self.layers.items() for key, role in layer.param_roles().items()}

    def on_step_end(self, step: int) -> None:
        for layer in self.layers.values():
            layer.on_step_end(step)

    def extra_loss(self) -> torch.Tensor | None:
        return sum_present(layer.extra_loss() for layer in self.layers.values())


class AdaptedParams(AdaptedModule):
    """A module whose parameters carry named adapters; behaves like the module with the adapted parameters."""

    view_class = ParamViews

    def forward(self, *args, **kwargs):
        if self.disabled:
            if self.merged:
                raise AdapterError(f"adapters {self.merged} are merged; unmerge them before disabling")
            return self.base_layer(*args, **kwargs)
        live = [self.adapters[n] for n in self.active if n not in self.merged]
        weights = {}
        for name, view in self.view.params.items():
            layers = [adapter.layers[name] for adapter in live if name in adapter.layers]
            if layers:
                w = view.weight
                for layer in layers:  # as merge() writes it, so that merging changes no output
                    w = view.stored(layer.merge_into(view.weight_oi(w).float(), view))
                weights[name] = w.contiguous()
        if not weights:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, weights, args, kwargs)

    def _fold(self, adapter: ParamAdapters, undo: bool) -> None:
        for name, layer in adapter.layers.items():
            view = self.view.params[name]
            fold = layer.unmerge_from if undo else layer.merge_into
            view.set_weight_oi(fold(view.weight_oi().float(), view))


# -- target selection and attach -----------------------------------------------------------------
def plan_parameters(model: nn.Module, config, method, module_targets: list[str]) -> dict[str, list[str]]:
    """{module name: names of its parameters that ``config.target_parameters`` selects}, checked before anything is
    attached. Matching is PEFT's: ``<module path>.<parameter>`` equals an entry or ends with ``"." + entry``;
    ``layers_to_transform`` / ``exclude_modules`` apply to ``target_modules`` only, as in PEFT."""
    spec = getattr(config, "target_parameters", None)
    if not spec:
        return {}
    if method.param_layer is None:
        raise ConfigError(f"{config.peft_type} does not support target_parameters")
    from .inject import _unwrap, logical_modules

    plan: dict[str, list[str]] = {}
    hits = {key: [] for key in spec}
    for mname, module in logical_modules(model):
        for pname, _ in _unwrap(module).named_parameters(recurse=False):
            full = f"{mname}.{pname}"
            keys = [k for k in spec if full == k or full.endswith("." + k)]
            if not keys:
                continue
            for k in keys:
                hits[k].append(full)
            _check_owner(module, mname, full, module_targets)
            plan.setdefault(mname, []).append(pname)
    top = [k for k in spec if k in dict(model.named_parameters(recurse=False))]
    if top:
        raise ConfigError(f"target_parameters {top}: parameters of the top-level model cannot be targeted (as PEFT)")
    missing = [k for k, found in hits.items() if not found]
    if missing:
        examples = sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, m in logical_modules(model)
                           for p, t in _unwrap(m).named_parameters(recurse=False) if t.dim() in (2, 3)})
        raise ConfigError(f"target_parameters entry {missing[0]!r} matched no parameter"
                          f"{f' (nor {missing[1:]})' if missing[1:] else ''}; parameters here include {examples[:12]}")
    return plan


def _check_owner(module: nn.Module, mname: str, full: str, module_targets: list[str]) -> None:
    if isinstance(module, ModulesToSave):
        raise ConfigError(f"target_parameters: {full!r} belongs to a module in modules_to_save or with trainable tokens")
    if mname in module_targets or (isinstance(module, AdaptedModule) and not isinstance(module, AdaptedParams)):
        raise ConfigError(f"target_parameters: {full!r} belongs to {mname!r}, which target_modules adapts as a whole; "
                          "adapt a module either by target_modules or by its parameters")
    from .inject import _unwrap

    if any(True for child in _unwrap(module).children() for _ in child.parameters()):
        raise ConfigError(f"target_parameters: {full!r} belongs to {mname!r}, which also holds submodules with "
                          "parameters; only modules whose parameters are all their own (MoE expert blocks) are supported")


def attach_parameters(model: nn.Module, config, name: str, method, plan: dict[str, list[str]]) -> None:
    """Put adapter ``name``'s layers on the parameters ``plan`` names (see ``plan_parameters``)."""
    from .inject import _set_submodule

    if not plan:
        return
    cls = method.param_layer(config)
    for mname, pnames in plan.items():
        module = model.get_submodule(mname)
        if not isinstance(module, AdaptedParams):
            module = AdaptedParams(module)
            _set_submodule(model, mname, module)
        layers = {}
        for pname in pnames:
            view = module.view.of(pname)
            with torch.device(view.weight.device):
                layer = cls(view, config, f"{mname}.{pname}")
            layer.to(device=view.weight.device, dtype=view.adapter_dtype())
            layers[pname] = layer
        adapters = ParamAdapters(module.view, layers, mname)
        adapters.train(module.base_layer.training)
        module.adapters[name] = adapters


def parameter_adapters(model: nn.Module, names: list[str] | str) -> list[str]:
    """Which of adapters ``names`` have parameter targets (``target_parameters``)."""
    from .inject import model_state

    configs = model_state(model).configs
    return [n for n in ([names] if isinstance(names, str) else names)
            if n in configs and getattr(configs[n], "target_parameters", None)]


def refuse_parameter_targets(model: nn.Module, names: list[str] | str, what: str) -> None:
    """An AdapterError naming target_parameters when any of ``names`` adapts parameters directly."""
    found = parameter_adapters(model, names)
    if found:
        raise AdapterError(f"adapters {found} use target_parameters (LoRA on nn.Parameters, e.g. MoE experts), which "
                           f"{what} does not support")
