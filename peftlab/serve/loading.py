"""Disk -> host serving forms, the store's cold load: check that an adapter can be served, get each layer's
``ServingForm`` (straight from the checkpoint where the layer class can, else by attaching it to the skeleton), an
input-side adapter's virtual tokens, prefix keys/values, sub-layer forms or attention prompts, and pack the forms
into one host buffer."""
from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch
from torch import nn

from peftlab.convert import weight_update
from peftlab.core.adapter import AdapterError, BaseView, ServingForm
from peftlab.core.inject import adapted_modules, delete_adapter, find_targets, is_linear, saved_modules
from peftlab.core.input_side import hooked
from peftlab.core.registry import method_for
from peftlab.core.serving_form import PromptAttentionForm, SublayerForm
from peftlab.core.state import attach_loaded, check_checkpoint
from peftlab.lowrank import lora_from_delta


Form = TypeVar("Form", ServingForm, SublayerForm, PromptAttentionForm)


class ServeError(ValueError):
    """An adapter cannot be served (names the adapter and the reason)."""


def check_servable(config, name: str) -> None:
    """Refuse adapters the slot tables cannot express, before anything is attached."""
    method = method_for(config)
    if method.kind == "weight" and method.layer_class(config).init_rewrites_base(config):
        raise ServeError(f"adapter {name!r}: its initialisation rewrites the base weights (PiSSA's, OLoRA's and "
                         "CorDA's residual, LoftQ's quantized weights), so it cannot share the served base; merge it (peftlab merge) or convert it "
                         "to a plain update first")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False) \
            or getattr(config, "modules_to_save", None) or config.trainable_tokens():
        raise ServeError(f"adapter {name!r}: trained biases / modules_to_save / trainable tokens are not servable")
    if getattr(config, "layer_replication", None):
        raise ServeError(f"adapter {name!r}: layer_replication builds a deeper model than the served base; merge it "
                         "(peftlab merge) and serve the merged model")
    if getattr(config, "alora_invocation_tokens", None):
        raise ServeError(f"adapter {name!r}: activated LoRA (alora_invocation_tokens) gates tokens per request, "
                         "which the batched slot tables do not; serve it with peftlab's model directly")
    if getattr(config, "target_parameters", None):
        raise ServeError(f"adapter {name!r}: target_parameters (LoRA on nn.Parameters, e.g. MoE experts) is not "
                         "servable; merge it (peftlab merge)")


def forms_of(model: nn.Module, name: str, convert_rank: int) -> tuple[dict[str, ServingForm], dict[str, float]]:
    """Serving forms of adapter ``name`` attached to ``model`` (and conversion errors by module)."""
    if any(name in m.modules_to_save for _, m in saved_modules(model)):
        raise ServeError(f"adapter {name!r}: modules_to_save are not servable")
    forms, converted = {}, {}
    for mname, module in adapted_modules(model):
        if name not in module.adapters:
            continue
        layer = module.adapters[name]
        form = layer.serving_form(module.view)
        if form is None:
            if not layer.mergeable or module.view.kind != "linear":
                raise ServeError(f"adapter {name!r}: {type(layer).__name__} on {mname!r} has no batched serving form "
                                 "and cannot be converted to LoRA (not a mergeable linear update)")
            try:
                delta = weight_update(module, name)
            except AdapterError as exc:  # e.g. an update that also changes the bias
                raise ServeError(f"adapter {name!r}: {exc}") from None
            lr = lora_from_delta(delta, min(convert_rank, *delta.shape), name=f"{name}:{mname}")
            form, converted[mname] = ServingForm(down=lr.A, up=lr.B), lr.rel_error
        forms[mname] = form
    return forms, converted


def forms_from_state(model: nn.Module, config, name: str, tensors: dict[str, torch.Tensor], source: str,
                     device: torch.device | str | None = None) -> dict[str, ServingForm] | None:
    """The serving forms of an adapter straight from its checkpoint ``tensors`` (file keys without
    ``base_model.model.``) on ``model``'s targets, without attaching it: no modules built, nothing copied into them.
    Only for layer classes that can (``serves_from_state``) on plain linear targets with nothing shared across
    layers; None otherwise (the caller attaches). Missing, unexpected or misshapen keys raise as loading does.
    ``device``: where the forms are computed (default: the base weights'); the store asks for the CPU, since the
    forms go to a host buffer next: computing them on the GPU cost a copy there and back per tensor (the cold load
    took 44-51 ms on an H200 that way)."""
    method = method_for(config)
    cls = method.layer_class(config)
    if method.kind != "weight" or not cls.serves_from_state or method.make_shared is not None:
        return None
    modules = {target: model.get_submodule(target) for target in find_targets(model, config)}
    if not all(is_linear(m) and "linear" in cls.supported_kinds for m in modules.values()):
        return None
    views = {target: BaseView(m) for target, m in modules.items()}
    shapes = {target: cls.state_shapes(view, config, target) for target, view in views.items()}
    check_checkpoint({f"{t}.{suffix}": shape for t, s in shapes.items() for suffix, shape in s.items()},
                     tensors, source, name)
    forms = {}
    for target, view in views.items():
        # the built layer's dtype, as attach makes it
        kind = {"device": view.weight.device if device is None else device, "dtype": view.adapter_dtype()}
        state = {suffix: tensors[f"{target}.{suffix}"].to(**kind) for suffix in shapes[target]}
        forms[target] = cls.serving_form_from_state(state, view, config, target)
    return forms


def pack_to_host(forms: dict[str, Form], dtype: torch.dtype, pin: bool) -> dict[str, Form]:
    """The forms (``ServingForm``, ``SublayerForm`` or ``PromptAttentionForm``) as views into ONE host buffer (pinned when ``pin``): one
    allocation and one device sync per adapter instead of one per tensor, and fast asynchronous copies into the
    slots later."""
    tensors = [(m, key, value) for m, f in forms.items() for key, value in vars(f).items()
               if isinstance(value, torch.Tensor)]
    total = sum(v.numel() for _, _, v in tensors)
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    out = {m: type(f)(**vars(f)) for m, f in forms.items()}
    offset = 0
    for m, key, value in tensors:
        view = buffer[offset:offset + value.numel()].view(value.shape)
        view.copy_(value.detach(), non_blocking=pin)
        setattr(out[m], key, view)
        offset += value.numel()
    if pin:
        torch.cuda.synchronize()
    return out


class InputSideParts(NamedTuple):
    """What serving keeps of an input-side adapter; one kind of part is set, the others are None / empty."""

    virtual: torch.Tensor | None  # (n, hidden) virtual token embeddings
    prefix_kv: torch.Tensor | None  # (layers, 2, n, kv_heads, head_dim) prefix keys / values
    sublayer: dict[str, SublayerForm]  # sub-layer module name -> form (bottleneck adapters)
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # attention module name -> (prompt, gate): LLaMA-Adapter


def input_side_parts(model: nn.Module, name: str, tmp: str, config, tensors: dict, source: str, dtype: torch.dtype,
                     device: torch.device) -> InputSideParts:
    """The parts of an input-side adapter serving keeps, computed once at load on the served ``model`` (attached
    there inactive as ``tmp``, detached again). Adapters acting through other module hooks than whole sub-layers or
    prompt attention are refused."""
    attach_loaded(model, config, tmp, tensors, source, activate=False)
    try:
        adapter = hooked(model)[tmp].eval()
        if adapter.sublayer_serving:
            return InputSideParts(None, None, adapter.sublayer_forms(), {})
        if adapter.prompt_attention_serving:
            return InputSideParts(None, None, {}, adapter.attention_prompts())
        if adapter.handles or not (adapter.num_virtual_tokens or adapter.num_prefix_tokens):
            raise ServeError(f"adapter {name!r}: {config.peft_type} works through model hooks (inserted modules), "
                             "which serve does not batch; virtual-token, prefix, sub-layer (bottleneck) and prompt-"
                             "attention (LLaMA-Adapter) methods are served")
        with torch.no_grad():
            virtual = prefix = None
            if adapter.num_virtual_tokens:
                virtual = adapter.virtual_tokens(1, dtype)[0].to(device).clone()
            if adapter.num_prefix_tokens:
                recorder = _PrefixRecorder()
                adapter.write_prefix(recorder, 1, dtype)
                prefix = torch.stack([torch.stack(recorder.layers[i]) for i in range(len(recorder.layers))])
                prefix = prefix.to(device).contiguous()
            return InputSideParts(virtual, prefix, {}, {})
    finally:
        delete_adapter(model, tmp)


class _PrefixRecorder:
    """Stands in for a transformers cache: ``write_prefix`` hands it each layer's (1, kv_heads, n, head_dim) keys
    and values, kept as (n, kv_heads, head_dim)."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        self.layers[layer] = (keys[0].transpose(0, 1), values[0].transpose(0, 1))
        return keys, values
