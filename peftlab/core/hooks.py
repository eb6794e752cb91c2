"""Model-level training hooks, generic over the contract.

* ``step_end(model, step)``: after each optimizer step, every active adapter layer's
  ``on_step_end`` and every method's model-level ``on_step_end(model, name, step)`` (AdaLoRA's
  global rank budget) run. Our trainer calls it; ``peftlab.train.hf.PeftlabCallback`` does it for
  HF ``Trainer``.
* ``log_stats(model)``: every active adapter's model-level statistics for the training log
  (``Method.log_stats``), read and reset at each log line by our trainer.
* extra losses: a forward hook on the model adds ``sum(layer.extra_loss())`` of the active
  adapters to ``output.loss`` while training, so any trainer that reads ``output.loss`` (ours,
  HF ``Trainer``, TRL) optimises the regulariser without knowing about it.
* token masks: a forward pre-hook hands the call's attention mask to the active layers that declare
  ``reads_token_mask`` (MoLoRA's balancing loss leaves padding out), and to none when no active
  adapter's layer class declares it, so other models pay one short loop over their configs.
* call arguments: a pre-hook ahead of all others takes the keywords that attached layer classes declare in
  ``call_arguments`` (Poly's ``task_ids``) out of the call and hands them, or those of ``peftlab.call_inputs``, to the active layers.
* caches: the token-mask pre-hook first has the active layers that declare ``refreshes_caches`` bring what they
  cache from their base up to date (``refresh``; DoRA's ||W0||^2, which compiled layers read).
* token gates: the same pre-hook asks each active adapter's method for a gate of the call's tokens
  (``Method.token_gate``: aLoRA acts from its invocation tokens on) and sets it as ``layer.gate`` on that
  adapter's layers.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .adapter import sum_present
from .inject import adapted_modules, model_state
from .registry import method_for


def _active_layers(model: nn.Module):
    for _, module in adapted_modules(model):
        for name in module.active:
            yield name, module.adapters[name]


def extra_loss(model: nn.Module) -> torch.Tensor | None:
    """The active layers' regularisers, each class's layers summed by its ``extra_loss_of``."""
    by_class: dict[type, list] = {}
    for _, layer in _active_layers(model):
        by_class.setdefault(type(layer), []).append(layer)
    return sum_present(cls.extra_loss_of(layers) for cls, layers in by_class.items())


def step_end(model: nn.Module, step: int) -> None:
    for _, layer in _active_layers(model):
        layer.on_step_end(step)
    state = model_state(model)
    for name in state.active:
        hook = method_for(state.configs[name]).on_step_end
        if hook is not None:
            hook(model, name, step)


def log_stats(model: nn.Module) -> dict:
    """{adapter name: {stat: value}} for active adapters whose method reports statistics."""
    state = model.__dict__.get("_peftlab")
    if state is None:  # not a peftlab model (compare --with-peft trains PEFT's)
        return {}
    out = {}
    for name in state.active:
        hook = method_for(state.configs[name]).log_stats
        if hook is not None:
            out[name] = hook(model, name)
    return out


def _add_extra_loss(module: nn.Module, args, kwargs, output):
    if not module.training or getattr(output, "loss", None) is None:
        return output
    extra = extra_loss(module)
    if extra is not None:
        output.loss = output.loss + extra.to(output.loss.dtype)
    return output


def _declared(model: nn.Module, flag: str) -> bool:
    """Whether an active adapter's layer class declares the capability ``flag`` (one short loop over the configs)."""
    state = model_state(model)
    return any(getattr(method_for(state.configs[n]).layer_class(state.configs[n]), flag, False) for n in state.active)


def _mask_readers(model: nn.Module) -> list:
    if not _declared(model, "reads_token_mask"):
        return []
    return [layer for _, layer in _active_layers(model) if layer.reads_token_mask]


def _attention_mask(module: nn.Module, args: tuple, kwargs: dict):
    """The call's ``attention_mask``, by keyword or by its place in ``forward``'s signature (found once per model)."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    place = module.__dict__.get("_peftlab_mask_place")
    if place is None:
        names = list(inspect.signature(module.forward).parameters)
        place = module.__dict__["_peftlab_mask_place"] = names.index("attention_mask") if "attention_mask" in names \
            else -1
    return args[place] if 0 <= place < len(args) else None


def _refresh_caches(model: nn.Module) -> None:
    """The active layers whose class ``refreshes_caches`` bring their caches up to date (not inside a compiled
    trace of the whole model: there the layers read what the last eager forward or their construction left)."""
    if torch.compiler.is_compiling() or not _declared(model, "refreshes_caches"):
        return
    for _, module in adapted_modules(model):
        for name in module.active:
            layer = module.adapters[name]
            if layer.refreshes_caches:
                layer.refresh(module.view)


def _share_token_mask(module: nn.Module, args, kwargs):
    _refresh_caches(module)
    readers = _mask_readers(module)
    if readers:
        mask = _attention_mask(module, args, kwargs)
        mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for layer in readers:
            layer.token_mask = mask
    _share_gates(module, args, kwargs)
    return None


CALL_INPUTS = "_peftlab_call_inputs"  # model.__dict__ key of the values ``peftlab.call_inputs`` supplies
CALL_VALUES = "_peftlab_call_values"  # model.__dict__ key of the current call's values of every call argument


def weight_call_arguments(model: nn.Module) -> set[str]:
    """The call keywords the attached weight-side adapters' layer classes read (``AdapterLayer.call_arguments``)."""
    state = model.__dict__.get("_peftlab")
    if state is None:
        return set()
    names = set()
    for config in state.configs.values():
        method = method_for(config)
        if method.kind == "weight":
            names.update(method.layer_class(config).call_arguments)
    return names


def call_argument_names(model: nn.Module) -> set[str]:
    """Every call keyword an attached adapter reads: weight-side layer classes' and input-side adapters'
    ``call_arguments`` (Poly's and multitask prompt tuning's ``task_ids``, CPT's ``input_type_mask``)."""
    from .input_side import hooked

    names = weight_call_arguments(model)
    container = hooked(model)
    if container is not None:
        names.update(n for adapter in container.values() for n in adapter.call_arguments)
    return names


def _share_call_arguments(model: nn.Module, args, kwargs):
    """Runs before every other pre-hook of the model (prepended): takes the call arguments out of the call, so the
    base model never sees them, and keeps their values (else those of ``peftlab.call_inputs``) for this call: on the
    active weight-side layers that read them and in ``CALL_VALUES`` for the input-side pre-hook."""
    names = call_argument_names(model)
    if not names:
        return None
    values = {**model.__dict__.get(CALL_INPUTS, {}), **{n: kwargs[n] for n in names if n in kwargs}}
    model.__dict__[CALL_VALUES] = values
    for _, layer in _active_layers(model):
        if layer.call_arguments:
            layer.call_inputs = {n: values.get(n) for n in layer.call_arguments}
    if not names.intersection(kwargs):
        return None
    return args, {k: v for k, v in kwargs.items() if k not in names}


def _call_tokens(args, kwargs) -> tuple[torch.Tensor | None, tuple[int, int] | None, bool]:
    """(input_ids, (B, T), whether the call continues a key-value cache) of a causal LM call."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    lead = tuple(ids.shape[:2]) if ids is not None and ids.dim() == 2 else \
        tuple(embeds.shape[:2]) if isinstance(embeds, torch.Tensor) else None
    past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 names it ``cache`` in generate
    cached = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
    return (ids if ids is not None and ids.dim() == 2 else None), lead, cached


def _share_gates(model: nn.Module, args, kwargs) -> None:
    """Each active adapter whose layer class ``reads_token_gate`` (aLoRA) gets this call's gate from its method's
    ``token_gate`` on its layers (``layer.gate``); the method keeps what it needs across a cached generation in
    ``memory``. Other models pay one short loop over their active configs."""
    state = model_state(model)
    methods = {n: method_for(state.configs[n]) for n in state.active}
    gated = [(n, m.token_gate) for n, m in methods.items()
             if getattr(m.layer_class(state.configs[n]), "reads_token_gate", False)]
    if not gated:
        return
    ids, lead, cached = _call_tokens(args, kwargs)
    memories = model.__dict__.setdefault("_peftlab_gate_memory", {})
    for name, fn in gated:
        gate = fn(state.configs[name], ids, lead, cached, memories.setdefault(name, {})) if lead else None
        if gate is None:
            continue
        for _, module in adapted_modules(model):
            if name in module.adapters:
                module.adapters[name].gate = gate


def _after_forward(module: nn.Module, args, kwargs, output):
    if not (module.training and torch.is_grad_enabled()):  # else kept: checkpointing recomputes in backward
        for layer in _mask_readers(module):
            layer.token_mask = None
    return _add_extra_loss(module, args, kwargs, output)


def install_model_hooks(model: nn.Module) -> None:
    """Idempotent: the extra-loss forward hook, the token-mask pre-hook and the call-arguments pre-hook, once per
    model."""
    if model.__dict__.get("_peftlab_hooks") is None:
        model.__dict__["_peftlab_hooks"] = (
            model.register_forward_hook(_after_forward, with_kwargs=True),
            model.register_forward_pre_hook(_share_token_mask, with_kwargs=True),
            model.register_forward_pre_hook(_share_call_arguments, with_kwargs=True, prepend=True),
        )


def remove_model_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop("_peftlab_hooks", None) or ():
        handle.remove()
