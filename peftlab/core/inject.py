"""Target selection and wrapping: ``attach`` puts a named adapter on every matching module.

Target semantics follow PEFT: a list of names matches a module whose name equals an entry or ends
with ``"." + entry``; a string is a regex that must match the whole name; ``"all-linear"`` is every
linear layer except the output head. ``exclude_modules`` uses the same forms;
``layers_to_transform`` keeps modules whose layer index (found after ``layers_pattern``) is listed.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .adapter import AdaptedModule, AdapterError, BaseView, ModulesToSave
from .config import AdapterConfig, ConfigError
from .params import AdaptedParams, attach_parameters, plan_parameters
from .registry import method_for
from .view import Conv1D, is_norm

_DEFAULT_LAYER_PATTERNS = ("layers", "h", "blocks", "layer", "block")


@dataclass
class ModelState:
    """Book-keeping stored on the model: the configs of attached adapters and which are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # per adapter, the tensors its layers share (methods registered with make_shared); see SharedTensors
    shared: dict[str, nn.Module] = field(default_factory=dict)
    layer_replication: list | None = None  # the map the decoder layers were replicated with (core/replicate.py)


def model_state(model: nn.Module) -> ModelState:
    state = model.__dict__.get("_peftlab")
    if state is None:
        state = ModelState()
        model.__dict__["_peftlab"] = state
    return state


# -- module walking ----------------------------------------------------------------------------
def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) as the user sees them: wrappers stand for the module they wrap."""

    def walk(prefix: str, module: nn.Module):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if not isinstance(child, (AdaptedModule, ModulesToSave)):
                yield from walk(name, child)

    yield from walk("", model)


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedModule]]:
    for name, module in logical_modules(model):
        if isinstance(module, AdaptedModule):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in logical_modules(model):
        if isinstance(module, ModulesToSave):
            yield name, module


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, AdaptedModule):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bool(Conv1D and isinstance(module, Conv1D))


def _is_wrappable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding) or is_norm(module)


# -- matching ----------------------------------------------------------------------------------
def _matches(spec: list[str] | str | None, name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    pats = [patterns] if isinstance(patterns, str) else list(patterns or _DEFAULT_LAYER_PATTERNS)
    for pat in pats:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    head = _unwrap(head)
    return {name for name, module in logical_modules(model) if _unwrap(module) is head}


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config`` targets; an error lists real names when nothing matches."""
    spec = config.target_modules
    all_linear = isinstance(spec, str) and spec.lower() in ("all-linear", "all_linear")
    heads = _output_head_names(model) if all_linear else set()
    found = []
    for name, module in logical_modules(model):
        base = _unwrap(module)
        if isinstance(module, ModulesToSave):
            continue
        if all_linear:
            if not is_linear(base) or name in heads:
                continue
        elif not _matches(spec, name):
            continue
        if _matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None:
            idx = _layer_index(name, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        found.append(name)
    if not found:
        leaf = sorted({n.rsplit(".", 1)[-1] for n, m in logical_modules(model) if _is_wrappable(_unwrap(m))})
        raise ConfigError(
            f"target_modules={spec!r} matched no module (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}); wrappable module names here include {leaf[:12]}"
        )
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# -- attach / detach ---------------------------------------------------------------------------
def attach(model: nn.Module, config: AdapterConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Attach adapter ``name`` described by ``config`` to ``model`` in place; freeze the base."""
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"attach() needs an adapter config, got {type(config).__name__}")
    if not name or "." in name:
        raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.'")
    config.validate()  # again: a field set after the config was built (config.r = 0) is refused here, by name
    state = model_state(model)
    if name in state.configs:
        raise AdapterError(f"an adapter named {name!r} is already attached; pick another name or delete it first")
    method = method_for(config)
    replication = getattr(config, "layer_replication", None)  # PEFT's LoraConfig field
    if replication:  # before the targets are found: the copies take adapters of their own
        from .replicate import replicate_layers

        if state.configs and state.layer_replication is None:
            raise ConfigError(f"layer_replication={replication!r} must come with the first adapter on a model "
                              f"(attached already: {list(state.configs)})")
        state.layer_replication = replicate_layers(model, replication, state.layer_replication)
    # checked before anything is attached
    wraps = method.kind == "weight" and method.layer_class(config).supported_kinds  # empty: no module (see flags)
    targets = module_targets(model, config) if wraps else []
    params = plan_parameters(model, config, method, targets)
    token_rows = config.trainable_tokens()
    tokens = None
    if token_rows is not None:
        from .tokens import token_plan

        tokens = token_plan(model, token_rows.spec, [*(config.modules_to_save or []), *targets], token_rows.field)
    if not state.configs:
        for p in model.parameters():
            p.requires_grad_(False)
    if method.kind == "input":
        method.input_hooks.attach(model, config, name)
    else:
        _attach_weight_method(model, config, name, method, targets)
        attach_parameters(model, config, name, method, params)
    for target in config.modules_to_save or []:
        _add_module_to_save(model, target, name)
    if tokens:
        from .tokens import add_trainable_tokens

        add_trainable_tokens(model, tokens, name, nested=token_rows.nested, init_weights=token_rows.init_weights)
    state.configs[name] = config
    from .hooks import install_model_hooks

    install_model_hooks(model)
    # also when not activating: set_active freezes the new adapter's parameters
    set_active(model, name if activate or not state.active else state.active)
    return model


def module_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """``find_targets``, except that a config adapting only parameters (``target_parameters`` with empty
    ``target_modules``, core/params.py) targets no module."""
    if getattr(config, "target_parameters", None) and not config.target_modules:
        return []
    targets = find_targets(model, config)
    taken = [t for t in targets if isinstance(model.get_submodule(t), AdaptedParams)]
    if taken:
        raise ConfigError(f"targets {taken[:3]} have adapters on their parameters (target_parameters); adapt a module "
                          "either by target_modules or by its parameters")
    return targets


def _attach_weight_method(model: nn.Module, config: AdapterConfig, name: str, method, targets: list[str]) -> None:
    if not targets:
        return
    wrapped = []
    for target in targets:
        module = model.get_submodule(target)
        if not isinstance(module, AdaptedModule):
            if not _is_wrappable(module):
                raise ConfigError(
                    f"target {target!r} is a {type(module).__name__}; {config.peft_type} wraps Linear, Conv1D, "
                    "Embedding or a norm layer"
                )
            module = AdaptedModule(module)
            _set_submodule(model, target, module)
        wrapped.append((target, module))
    shared = None
    if method.make_shared is not None:  # one set of shared tensors for all this adapter's layers
        with torch.device(wrapped[0][1].base_layer.weight.device):
            shared = method.make_shared(config, {target: module.view for target, module in wrapped})
    new_layers = []
    for target, module in wrapped:
        ref = module.base_layer.weight
        with torch.device(ref.device):  # build on the base's device (also "meta" for parameter counting)
            layer = method.make_layer(module.view, config, target, shared)
        layer.to(device=ref.device, dtype=module.view.adapter_dtype())
        layer.train(module.base_layer.training)  # no adapter dropout in a model that is in eval mode
        module.adapters[name] = layer
        new_layers.append((module, layer))
    if shared is not None:
        model_state(model).shared[name] = shared
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
    elif bias.endswith("_only"):  # PEFT's "<method>_only" ("lora_only", "gralora_only"): the targets' own biases
        for module, _ in new_layers:
            if module.view.bias is not None:
                module.view.bias.requires_grad_(True)


def _add_module_to_save(model: nn.Module, target: str, name: str) -> None:
    hits = [n for n, m in logical_modules(model) if n == target or n.endswith("." + target)]
    if not hits:
        raise ConfigError(f"modules_to_save entry {target!r} matched no module")
    for hit in hits:
        module = model.get_submodule(hit)
        if isinstance(module, AdaptedModule):
            raise ConfigError(f"{hit!r} is both a target and in modules_to_save")
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_submodule(model, hit, module)
        module.add(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; wrappers left with no adapter are unwrapped, and with the last adapter
    the model-level hooks (core/hooks.py)."""
    state = model_state(model)
    if name not in state.configs:
        raise AdapterError(f"no adapter named {name!r}; have {list(state.configs)}")
    config = state.configs.pop(name)
    state.shared.pop(name, None)
    method = method_for(config)
    if method.kind == "input":
        method.input_hooks.detach(model, name)
    for mname, module in list(adapted_modules(model)):
        if name in module.adapters:
            if name in module.merged:
                module.unmerge(name)
            del module.adapters[name]
            module.active = [a for a in module.active if a != name]
        if not len(module.adapters):
            _set_submodule(model, mname, module.base_layer)
    for mname, module in list(saved_modules(model)):
        if name in module.modules_to_save:
            del module.modules_to_save[name]
        if not len(module.modules_to_save):
            _set_submodule(model, mname, module.original_module)
    state.active = [a for a in state.active if a != name]
    set_active(model, state.active or None)
    if not state.configs:  # the last adapter: the model-level hooks go too
        from .hooks import remove_model_hooks

        remove_model_hooks(model)


# -- activity ----------------------------------------------------------------------------------
def set_active(model: nn.Module, names: str | list[str] | None) -> None:
    """Make ``names`` the active adapters (None: bare base). Only active adapters train."""
    state = model_state(model)
    wanted = [] if names is None else [names] if isinstance(names, str) else list(names)
    for n in wanted:
        if n not in state.configs:
            raise AdapterError(f"no adapter named {n!r}; have {list(state.configs)}")
    state.active = wanted
    for _, module in adapted_modules(model):
        module.active = [n for n in wanted if n in module.adapters]
        for n, layer in module.adapters.items():
            for p in layer.adapter_params():
                p.requires_grad_(n in wanted)
    for _, module in saved_modules(model):
        module.active = next((n for n in wanted if n in module.modules_to_save), None)
        for n, copy in module.modules_to_save.items():
            for p in copy.parameters():
                p.requires_grad_(n == module.active)
    for n, config in state.configs.items():
        method = method_for(config)
        if method.kind == "input":
            method.input_hooks.set_active(model, n, n in wanted)


@contextmanager
def disabled(model: nn.Module):
    """Run the bare base model inside the block (merged adapters must be unmerged first)."""
    modules = [m for _, m in adapted_modules(model)] + [m for _, m in saved_modules(model)]
    state = model_state(model)
    previous = list(state.active)
    for m in modules:
        m.disabled = True
    input_names = [n for n in previous if method_for(state.configs[n]).kind == "input"]
    for n in input_names:
        method_for(state.configs[n]).input_hooks.set_active(model, n, False)
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False
        for n in input_names:
            method_for(state.configs[n]).input_hooks.set_active(model, n, True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def adapter_layers(model: nn.Module, name: str | None = None):
    """(module name, adapter name, layer) for every adapter layer (of ``name`` if given)."""
    for mname, module in adapted_modules(model):
        for n, layer in module.adapters.items():
            if name is None or n == name:
                yield mname, n, layer


__all__ = [
    "BaseView", "attach", "delete_adapter", "set_active", "disabled", "count_parameters", "find_targets",
    "adapter_layers", "model_state", "adapted_modules", "saved_modules", "logical_modules",
]
