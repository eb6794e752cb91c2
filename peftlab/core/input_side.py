"""Adapters that act through hooks instead of wrapping a linear layer (``Method.kind == "input"``).

Core talks to such a method only through the object it registers as ``input_hooks``, a
``HookMethod``: ``attach(model, config, name)``, ``detach(model, name)``,
``set_active(model, name, active)``, ``state_tensors(model, name)`` and two flags,
``identity_at_init`` and ``top_level_keys`` (checkpoint keys PEFT stores without the
``base_model.model.`` prefix, such as prompt learning's ``prompt_embeddings``).

Every attached adapter is one ``HookedAdapter`` kept in ``model.peftlab_hooked[name]``, so
``model.parameters()``, ``.to()``, optimizers and HF ``Trainer`` see its parameters. Its parameters
are plain tensors, never ``nn.Linear``, so a later ``target_modules="all-linear"`` does not wrap them.
An adapter acts in one or both of two ways:

* module hooks it installs itself (``install``): LLaMA-Adapter on attention modules, bottleneck
  adapters on the attention / feed-forward sub-layers;
* a sequence contribution, applied by one forward pre-hook on the model: ``n`` virtual tokens
  prepended to ``inputs_embeds`` (prompt tuning, P-tuning) and/or ``n`` key/value positions written
  into the KV cache before the caller's tokens (prefix tuning).

For sequence contributions the pre-hook keeps the caller's view intact. On the first step (no cache,
or an empty one) it prepends the prompts, fills the prefix cache and pads ``labels`` with -100; on
every step it prepends ones to the 2-D attention mask and shifts given ``position_ids`` by the number
of virtual positions, so cached decoding in ``generate()`` sees the prefix exactly once. After the
forward the logits (and hidden states) of prepended virtual tokens are dropped, so outputs line up
with the caller's tokens and any trainer can use them (PEFT returns them; compare ``logits[:, n:]``).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch
from torch import nn

from .adapter import AdapterError
from .config import AdapterConfig
from .hooks import CALL_INPUTS, CALL_VALUES, call_argument_names
from .serving_form import SublayerForm

CONTAINER = "peftlab_hooked"


class HookedAdapter(nn.Module):
    """One attached adapter of a hook-based method. Subclasses set what they contribute.

    ``num_virtual_tokens`` > 0: ``virtual_tokens(batch, dtype)`` returns (batch, n, dim) embeddings to
    prepend. ``num_prefix_tokens`` > 0: ``write_prefix(cache, batch, dtype)`` appends n key/value
    positions to every layer of ``cache``. ``install(model)`` returns handles of its own module hooks,
    which must do nothing while ``self.active`` is False. ``compiles_in_layers``, ``token_local``,
    ``replays_as_graphs``, ``recomputes_pointwise``, ``draws_random``, ``loss_in_forward``, ``reads_outer_graph``: as
    on ``AdapterLayer``.

    ``call_arguments``: keyword arguments of the model call this adapter reads (multitask prompt tuning's
    ``task_ids``). The pre-hook takes them out of every call, so the base model never sees them, and hands them
    by keyword to ``virtual_tokens`` / ``write_prefix`` / ``relabel`` / ``loss``; values set for a block with
    ``call_inputs(model, ...)`` fill those a call does not pass (``generate()`` refuses unknown keywords).
    ``relabel(labels)``: (labels of this adapter's virtual tokens, the caller's labels), by default -100 and the
    labels unchanged. ``loss(logits, labels, length)`` over the full sequence (virtual tokens included; ``length``
    of them the caller's): if not None, it replaces the model's loss (CPT's weighted loss).

    ``sublayer_serving``: the adapter acts only on whole sub-layers (attention, MLP) of the decoder layers, as
    ``sublayer_forms()`` says, one ``SublayerForm`` per sub-layer module name: the serving engine batches those
    (bottleneck adapters). ``prompt_attention_serving``: the adapter adds, inside attention modules, a gated attention
    of the layer's rotary queries over keys/values that the layer's own k_proj / v_proj make of a prompt
    (``PromptAttentionForm``), as ``attention_prompts()`` says: the serving engine batches those (LLaMA-Adapter). Hook
    adapters with neither are refused by serve.
    """

    num_virtual_tokens: int = 0
    num_prefix_tokens: int = 0
    call_arguments: tuple[str, ...] = ()
    compiles_in_layers: bool = True
    token_local: bool = True
    replays_as_graphs: bool = True
    recomputes_pointwise: bool = False  # prompt tuning's frozen layers kept 15 MiB more with it (H100)
    draws_random: bool = False
    loss_in_forward: bool = False
    reads_outer_graph: bool = False
    sublayer_serving: bool = False
    prompt_attention_serving: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.handles: list[Any] = []
        self.settings: list[Any] = []

    def install(self, model: nn.Module) -> list[Any]:
        """Forward hooks on the model's modules (removed at detach); serving refuses adapters that have any."""
        return []

    def configure(self, model: nn.Module) -> list[Any]:
        """Handles (``remove()``) of model settings changed while attached that are not hooks: the same function of
        the inputs, computed another way (a KV prefix's attention implementation)."""
        return []

    def virtual_tokens(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def write_prefix(self, cache, batch: int, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def relabel(self, labels: torch.Tensor, **call) -> tuple[torch.Tensor, torch.Tensor]:
        return labels.new_full((labels.shape[0], self.num_virtual_tokens), -100), labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, length: int, **call) -> torch.Tensor | None:
        return None

    def sublayer_forms(self) -> dict[str, SublayerForm]:
        """(``sublayer_serving``) sub-layer module name -> this adapter's form there, detached."""
        raise NotImplementedError

    def attention_prompts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(``prompt_attention_serving``) attention module name -> (prompt (n, hidden), gate (1,)), detached."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the checkpoint, keyed relative to ``base_model.model.`` (or top level, for keys
        the method lists in ``top_level_keys``). Loading copies into them, so return parameters or buffers."""
        raise NotImplementedError


class HookMethod:
    """The ``input_hooks`` object core calls. ``build(model, config)`` makes the adapter module; merge
    refuses every input-side method (core/merge.py), so there is no merge surface here."""

    def __init__(self, build: Callable[[nn.Module, AdapterConfig], HookedAdapter], identity_at_init: bool = False,
                 top_level_keys: tuple[str, ...] = (), folds_when_saving: bool = False,
                 kv_prefill: Callable[[AdapterConfig], bool] | None = None):
        self.build = build
        # kv_prefill(config): the adapter built for this config is a KV table that a prefill of the base model can set
        # (its ``load_rows``; peftlab/kv_prefill.py): prefix tuning without its encoder, Cartridges
        self._kv_prefill = kv_prefill
        self.identity_at_init = identity_at_init
        self.top_level_keys = top_level_keys
        # the file holds a folded form of the live tensors (the method's to_file: CPT's E + proj(D)), so a loaded
        # adapter is the same function in another parametrisation: compare the files, not the live tensors
        self.folds_when_saving = folds_when_saving

    def kv_prefill(self, config: AdapterConfig) -> bool:
        return self._kv_prefill is not None and bool(self._kv_prefill(config))

    def attach(self, model: nn.Module, config: AdapterConfig, name: str) -> None:
        ref = _reference_parameter(model)
        with torch.device(ref.device):
            adapter = self.build(model, config)
        adapter.to(device=ref.device, dtype=torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype)
        adapter.train(model.training)  # no adapter dropout in a model that is in eval mode (as weight-side layers)
        adapter.handles = adapter.install(model)
        adapter.settings = adapter.configure(model)
        container = hooked(model, create=True)
        container[name] = adapter

    def detach(self, model: nn.Module, name: str) -> None:
        container = hooked(model)
        if container is None or name not in container:
            return
        for handle in container[name].handles + container[name].settings:
            handle.remove()
        del container[name]
        if not len(container):
            for handle in container.__dict__.pop("model_handles", []):
                handle.remove()
            delattr(model, CONTAINER)

    def set_active(self, model: nn.Module, name: str, active: bool) -> None:
        adapter = hooked(model)[name]
        adapter.active = active
        for p in adapter.parameters():
            p.requires_grad_(active)

    def state_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return hooked(model)[name].state_tensors()


def own_loss_adapters(model: nn.Module) -> list[str]:
    """Active input-side adapters that set their own labels or loss (``relabel`` / ``loss`` overridden: CPT): a loss
    computed outside the model's forward (the fused cross-entropy) would not be theirs."""
    container = hooked(model)
    return [name for name, a in (container.items() if container is not None else ()) if a.active and (
        type(a).relabel is not HookedAdapter.relabel or type(a).loss is not HookedAdapter.loss)]


def hooked(model: nn.Module, create: bool = False) -> nn.ModuleDict | None:
    """The per-model container of hook-based adapters (made, with the model-level hooks, on first use)."""
    container = model._modules.get(CONTAINER)
    if container is None and create:
        container = nn.ModuleDict().train(model.training)
        setattr(model, CONTAINER, container)
        container.__dict__["model_handles"] = [
            model.register_forward_pre_hook(_before_forward, with_kwargs=True),
            # first among forward hooks: a method's own loss (CPT) is in place before core adds regularisers
            model.register_forward_hook(_after_forward, with_kwargs=True, prepend=True),
        ]
    return container


def _reference_parameter(model: nn.Module) -> torch.Tensor:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight
    return next(model.parameters())


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise AdapterError(f"{type(model).__name__} has no transformers config; input-side adapters need one")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# -- the sequence pre-hook ---------------------------------------------------------------------
def bind_call(model: nn.Module, signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All call arguments by name (the model's forward signature binds positional ones)."""
    bound = signature.bind(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for key, value in bound.items():
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise AdapterError(f"cannot place extra positional arguments {len(value)} of {type(model).__name__}")
        else:
            out[key] = value
    return out


def _past_length(cache) -> int:
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise AdapterError("prompt-side adapters need a transformers Cache object as the KV cache, not legacy tuples")
    return int(cache.get_seq_length())


@contextlib.contextmanager
def call_inputs(model: nn.Module, **values):
    """Within the block, model calls that do not pass them get these ``call_arguments`` of the attached adapters,
    input-side (``HookedAdapter.call_arguments``) or weight-side (``AdapterLayer.call_arguments``):
    ``with call_inputs(model, task_ids=ids): model.generate(...)``."""
    known = call_argument_names(model)
    if not known:
        raise AdapterError("call_inputs: no attached adapter reads call arguments")
    unknown = sorted(set(values) - known)
    if unknown:
        raise AdapterError(f"call_inputs: no attached adapter reads {unknown}; they read {sorted(known)}")
    before = model.__dict__.get(CALL_INPUTS, {})
    model.__dict__[CALL_INPUTS] = {**before, **values}
    try:
        yield
    finally:
        model.__dict__[CALL_INPUTS] = before


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    container = model._modules[CONTAINER]
    prompts = [a for a in container.values() if a.active and a.num_virtual_tokens]
    prefixes = [a for a in container.values() if a.active and a.num_prefix_tokens]
    container.__dict__["pending"] = None
    call = model.__dict__.get(CALL_VALUES, {})  # core's call-arguments pre-hook took them out of the call first
    if not prompts and not prefixes:
        return None
    pending = container.__dict__["pending"] = {"length": None, "drop_cache": False, "loss": None}

    def mine(adapter: HookedAdapter) -> dict:
        return {n: call.get(n) for n in adapter.call_arguments}
    signature = inspect.signature(model.forward)
    kw = bind_call(model, signature, args, kwargs)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        raise AdapterError("prompt-side adapters need exactly one of input_ids and inputs_embeds")
    batch, length = (ids if ids is not None else embeds).shape[:2]
    n_seq = sum(a.num_virtual_tokens for a in prompts)
    n_kv = sum(a.num_prefix_tokens for a in prefixes)
    # the forward's name for the KV cache: `cache` from transformers 5.24 on, `past_key_values` before
    key = "cache" if "cache" in signature.parameters else "past_key_values"
    if key != "past_key_values" and kw.get("past_key_values") is not None:  # a caller still using the old name
        kw[key] = kw.pop("past_key_values")
    first = _past_length(kw.get(key)) == 0
    dtype = _reference_parameter(model).dtype
    if first and prefixes:
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) and model.training:
            raise AdapterError("prefix tuning writes the KV cache and does not work with gradient checkpointing")
        cache = kw.get(key)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            use_cache = kw.get("use_cache")
            # a cache the caller did not ask for must not come back: generate(use_cache=False) would feed it in again
            pending["drop_cache"] = not (use_cache or (use_cache is None and getattr(model.config, "use_cache", False)))
        for adapter in prefixes:
            adapter.write_prefix(cache, batch, dtype, **mine(adapter))
        kw[key] = cache
    if first and prompts:
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        virtual = [a.virtual_tokens(batch, embeds.dtype, **mine(a)).to(embeds.device) for a in prompts]
        kw["inputs_embeds"], kw["input_ids"] = torch.cat(virtual + [embeds], dim=1), None
        if kw.get("labels") is not None:
            labels, heads = kw["labels"], []
            for adapter in prompts:
                head, labels = adapter.relabel(labels, **mine(adapter))
                heads.append(head)
            kw["labels"] = torch.cat(heads + [labels], dim=1)
            pending["loss"] = [(a, mine(a)) for a in prompts if type(a).loss is not HookedAdapter.loss]
            pending["labels"] = kw["labels"]
        if kw.get("token_type_ids") is not None:
            types = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([types.new_zeros((types.shape[0], n_seq)), types], dim=1)
        pending["length"] = length
    _extend_mask_and_positions(kw, n_kv + n_seq, n_kv, n_seq if first else 0)
    return (), kw


def _extend_mask_and_positions(kw: dict, shift: int, n_kv: int, n_new: int) -> None:
    """Prepend ``shift`` visible positions to the mask; caller positions move up by ``shift`` and the
    ``n_new`` virtual tokens of this call take positions n_kv .. n_kv + n_new - 1."""
    mask = kw.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise AdapterError(f"prompt-side adapters need a 2-D attention mask (batch, length), got {mask.dim()}-D")
        kw["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], shift)), mask], dim=1)
    positions = kw.get("position_ids")
    if positions is not None:
        if positions.dim() != 2:
            raise AdapterError(f"prompt-side adapters need 2-D position_ids, got {positions.dim()}-D")
        virtual = torch.arange(n_kv, n_kv + n_new, device=positions.device, dtype=positions.dtype)
        kw["position_ids"] = torch.cat([virtual.expand(positions.shape[0], n_new), positions + shift], dim=1)


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output):
    container = model._modules.get(CONTAINER)
    pending = container.__dict__.pop("pending", None) if container is not None else None
    if pending is None or not hasattr(output, "keys"):
        return output
    if pending["drop_cache"]:
        key = "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"
        if key in output.keys():
            output[key] = None  # item and attribute both (ModelOutput's setattr leaves the item when given None)
    length = pending["length"]
    if length is None:
        return output
    logits = getattr(output, "logits", None)
    for adapter, call in pending["loss"] or ():
        loss = adapter.loss(logits, pending["labels"], length, **call)
        if loss is not None:
            output.loss = loss
    if logits is not None and logits.shape[1] > length:
        output.logits = logits[:, logits.shape[1] - length:]
    hidden = getattr(output, "hidden_states", None)
    if isinstance(hidden, tuple):
        output.hidden_states = tuple(h[:, h.shape[1] - length:] for h in hidden)
    return output


__all__ = ["HookedAdapter", "HookMethod", "call_inputs", "hooked", "own_loss_adapters", "text_config", "CONTAINER"]
