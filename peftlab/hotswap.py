"""Hot-swap an attached adapter's weights in place, so a ``torch.compile``d model does not recompile.

No module is created or replaced and no tensor changes shape: the new checkpoint's values are copied into the
live tensors of adapter ``name``. Two kinds of adapter:

* layers with ``low_rank_factors`` (LoRA): the new adapter may have another rank (at most the prepared one;
  A's extra rows and B's extra columns are zero, so B A is unchanged), another ``lora_alpha``, rsLoRA,
  ``rank_pattern`` / ``alpha_pattern``, and fewer targets (the missing layers become zero). The scaling must
  then be a tensor: ``prepare_for_hotswap`` (call it BEFORE compiling) pads every layer to ``target_rank`` and
  turns the float ``scaling`` into a 0-d buffer, because dynamo guards on Python floats (a new float value
  recompiles) but reads buffers as graph inputs.
* any other method: the new adapter must have the same configuration; its tensors are copied as they are.

A new adapter that adapts a module the old one does not, or whose tensors do not fit, is refused before
anything is copied. The new layer's rank and scaling are read by building it on the meta device through the
method's own constructor (the contract), so nothing here knows a formula of any method.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftlab.core.adapter import AdapterError
from peftlab.core.inject import adapted_modules, model_state
from peftlab.core.params import refuse_parameter_targets
from peftlab.core.registry import method_for
from peftlab.core.state import PREFIX, load_tensors, read_adapter_weights, read_config

# config fields a factor (LoRA) hot-swap may change; anything else must be equal
_SWAPPABLE = frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                        "base_model_name_or_path", "revision", "inference_mode"})
_IGNORED = frozenset({"base_model_name_or_path", "revision", "inference_mode"})


def _layers(model: nn.Module, name: str):
    if name not in model_state(model).configs:
        raise AdapterError(f"no adapter named {name!r}; have {list(model_state(model).configs)}")
    out = {m: mod for m, mod in adapted_modules(model) if name in mod.adapters}
    merged = [m for m, mod in out.items() if name in mod.merged]
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into {merged[:3]}; unmerge it before swapping its weights")
    return out


def _factor_layers(modules: dict, name: str) -> bool:
    have = [mod.adapters[name].low_rank_factors() is not None for mod in modules.values()]
    return bool(have) and all(have)


def prepare_for_hotswap(model: nn.Module, name: str = "default", target_rank: int | None = None) -> None:
    """Pad adapter ``name``'s low-rank layers to ``target_rank`` (default: their largest rank) and store each
    scaling as a 0-d float32 buffer. Outputs are unchanged. Call before ``torch.compile``."""
    modules = _layers(model, name)
    refuse_parameter_targets(model, name, "prepare_for_hotswap (swap it with an adapter of the same configuration)")
    if not _factor_layers(modules, name):
        raise AdapterError(f"adapter {name!r} is not a low-rank (LoRA) adapter; it can be hot-swapped with an "
                           "adapter of the same configuration without preparation")
    ranks = {m: mod.adapters[name].low_rank_factors()[0].shape[0] for m, mod in modules.items()}
    rank = target_rank or max(ranks.values())
    too_big = {m: r for m, r in ranks.items() if r > rank}
    if too_big:
        raise AdapterError(f"target_rank {rank} is smaller than the rank of {sorted(too_big)[:3]} ({max(too_big.values())})")
    with torch.no_grad():
        for mname, module in modules.items():
            layer = module.adapters[name]
            a, b, scaling = layer.low_rank_factors()
            a.data = torch.cat([a.data, a.data.new_zeros(rank - a.shape[0], a.shape[1])], 0)
            b.data = torch.cat([b.data, b.data.new_zeros(b.shape[0], rank - b.shape[1])], 1)
            if not isinstance(scaling, torch.Tensor):
                if not isinstance(getattr(layer, "scaling", None), (int, float)):
                    raise AdapterError(f"{mname}: {type(layer).__name__} keeps no float `scaling` to turn into a tensor")
                del layer.scaling
                layer.register_buffer("scaling", torch.tensor(float(scaling), device=a.device), persistent=False)


def _config_changes(old, new, allowed: frozenset[str]) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    return sorted(k for k in set(a) | set(b) if k not in allowed and a.get(k) != b.get(k))


def _fresh_layer(method, module, config, mname):
    """The new adapter's layer for ``mname`` built on the meta device (shapes and scaling, no values)."""
    view = module.view
    if view.kind == "embedding":
        meta_base = nn.Embedding(view.in_features, view.out_features, device="meta")
    else:
        meta_base = nn.Linear(view.in_features, view.out_features, bias=False, device="meta")
    with torch.device("meta"):
        return method.make_layer(type(view)(meta_base), config, mname)


def hotswap_adapter(model: nn.Module, path: str | Path, name: str = "default") -> None:
    """Copy the adapter folder ``path`` into the attached adapter ``name`` in place (see the module docstring)."""
    modules = _layers(model, name)
    old, new = model_state(model).configs[name], read_config(path)
    source = str(Path(path))
    if new.peft_type != old.peft_type:
        raise AdapterError(f"{source}: a {new.peft_type} adapter cannot replace the {old.peft_type} adapter {name!r}")
    raw = read_adapter_weights(path)
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    if not _factor_layers(modules, name):
        changes = _config_changes(old, new, _IGNORED)
        if changes:
            raise AdapterError(f"{source}: hot-swapping {old.peft_type} needs the same configuration; differs in "
                               f"{changes}")
        load_tensors(model, name, tensors, source=source)
        return
    changes = _config_changes(old, new, _SWAPPABLE)
    if changes:
        raise AdapterError(f"{source}: hot-swap can change rank, alpha and targets only; differs in {changes}")
    method = method_for(new)
    plan, used = [], set()
    for mname, module in modules.items():
        layer = module.adapters[name]
        a_old, b_old, s_old = layer.low_rank_factors()
        fresh = _fresh_layer(method, module, new, mname)
        suffixes = {id(t): s for s, t in fresh.state_tensors().items()}
        a_meta, b_meta, s_new = fresh.low_rank_factors()
        keys = [f"{mname}.{suffixes[id(t)]}" for t in (a_meta, b_meta)]
        if len(fresh.state_tensors()) != 2:
            raise AdapterError(f"{mname}: {type(fresh).__name__} saves more than its two factors; not swappable")
        present = [k in tensors for k in keys]
        if not any(present):
            plan.append((a_old, b_old, None, None, layer, s_old))  # the new adapter leaves this module alone
            continue
        if not all(present):
            raise AdapterError(f"{source}: {keys[present.index(False)]!r} is missing")
        a_new, b_new = tensors[keys[0]], tensors[keys[1]]
        if a_new.shape != a_meta.shape or b_new.shape != b_meta.shape:
            raise AdapterError(f"{source}: {keys[0]} / {keys[1]} have shapes {tuple(a_new.shape)} / "
                               f"{tuple(b_new.shape)}, the configuration says {tuple(a_meta.shape)} / {tuple(b_meta.shape)}")
        if a_new.shape[0] > a_old.shape[0]:
            raise AdapterError(f"{mname}: the new rank {a_new.shape[0]} exceeds the prepared rank {a_old.shape[0]}; "
                               "call prepare_for_hotswap with a larger target_rank before compiling")
        if not isinstance(s_old, torch.Tensor) and float(s_new) != float(s_old):
            raise AdapterError(f"{mname}: the scaling changes ({float(s_old)} -> {float(s_new)}) but is a Python "
                               "float; call prepare_for_hotswap before compiling")
        if not isinstance(s_old, torch.Tensor) and a_new.shape[0] != a_old.shape[0]:
            raise AdapterError(f"{mname}: rank {a_old.shape[0]} -> {a_new.shape[0]} needs prepare_for_hotswap")
        used.update(keys)
        plan.append((a_old, b_old, a_new, b_new, layer, s_new))
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterError(f"{source}: adapts modules that adapter {name!r} does not ({extra[:3]}); hot-swap cannot add "
                           "modules")
    with torch.no_grad():
        for a_old, b_old, a_new, b_new, layer, scaling in plan:
            a_old.zero_()
            b_old.zero_()
            if a_new is not None:
                a_old[: a_new.shape[0]].copy_(a_new)
                b_old[:, : b_new.shape[1]].copy_(b_new)
            if isinstance(layer.low_rank_factors()[2], torch.Tensor):
                layer.low_rank_factors()[2].fill_(float(scaling))
    model_state(model).configs[name] = new


__all__ = ["hotswap_adapter", "prepare_for_hotswap"]
