"""Merge / unmerge / merge_and_unload, generic over the contract (``merge_into``/``unmerge_from``)."""
from __future__ import annotations

from torch import nn

from .adapter import AdapterError
from .hooks import remove_model_hooks
from .inject import _set_submodule, adapted_modules, model_state, saved_modules
from .registry import method_for


def _names(model: nn.Module, name: str | list[str] | None) -> list[str]:
    state = model_state(model)
    names = list(state.active) if name is None else [name] if isinstance(name, str) else list(name)
    for n in names:
        if n not in state.configs:
            raise AdapterError(f"no adapter named {n!r}; have {list(state.configs)}")
        if method_for(state.configs[n]).kind == "input":
            raise AdapterError(f"adapter {n!r} ({state.configs[n].peft_type}) acts on inputs and is not mergeable")
    return names


def merge(model: nn.Module, name: str | list[str] | None = None) -> None:
    """Fold adapter(s) (default: the active ones) into the base weights; forward is unchanged."""
    names = _names(model, name)
    modules = [(m, n) for _, m in adapted_modules(model) for n in names if n in m.adapters]
    for module, n in modules:  # check everything before touching any weight
        layer = module.adapters[n]
        if not layer.mergeable:
            raise AdapterError(f"adapter {n!r} ({type(layer).__name__}) on {layer.module_name!r} is not mergeable")
        if n in module.merged:
            raise AdapterError(f"adapter {n!r} on {layer.module_name!r} is already merged")
    if model_state(model).layer_replication is not None:  # copies share weights: each merges into its own
        from .replicate import unshare

        unshare(model, list({id(m): m.base_layer for m, _ in modules}.values()))
    for module, n in modules:
        module.merge(n)


def unmerge(model: nn.Module, name: str | list[str] | None = None) -> None:
    names = _names(model, name)
    modules = [(m, n) for _, m in adapted_modules(model) for n in reversed(names) if n in m.adapters]
    for module, n in modules:
        if n not in module.merged:
            raise AdapterError(f"adapter {n!r} on {module.adapters[n].module_name!r} is not merged; nothing to unmerge")
    for module, n in modules:
        module.unmerge(n)


def merge_and_unload(model: nn.Module, name: str | list[str] | None = None) -> nn.Module:
    """Merge the active adapters (or ``name``) and return the plain base model, wrappers removed."""
    names = _names(model, name)
    merge(model, names)
    if model_state(model).layer_replication is not None:
        from .replicate import materialize

        materialize(model)
    for mname, module in list(adapted_modules(model)):
        _set_submodule(model, mname, module.base_layer)
    for mname, module in list(saved_modules(model)):
        keep = next((n for n in names if n in module.modules_to_save), None)
        _set_submodule(model, mname, module.unloaded(keep))
    for n, config in model_state(model).configs.items():
        method = method_for(config)
        if method.kind == "input":
            method.input_hooks.detach(model, n)
    model.__dict__.pop("_peftlab", None)
    remove_model_hooks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
