"""The method registry: ``register(...)`` at the bottom of each method file, lookup by peft_type.

Method files in ``peftlab.methods`` are discovered by package scan, so adding a method is adding
one file; nothing here lists them.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from .config import AdapterConfig, ConfigError


@dataclass(frozen=True)
class Method:
    peft_type: str
    config: type[AdapterConfig]
    layer: type | None = None  # AdapterLayer subclass for weight-attached methods
    kind: str = "weight"  # "weight" (wraps modules) or "input" (acts through the model-level hook)
    # For kind="input": callables attach(model, config, name) and the state hooks; see core/hooks.py.
    input_hooks: Any = None
    layer_factory: Callable[..., Any] | None = None  # optional: pick a layer class per config
    # default_config(target_modules, r) -> a sensible config of this method, used by `compare`
    # and by the contract test suite; `variant` names registrations that share a peft_type (DoRA).
    default_config: Callable[..., AdapterConfig] | None = None
    # optional model-level hook after each optimizer step: on_step_end(model, adapter_name, step)
    on_step_end: Callable[..., None] | None = None
    # optional: make_shared(config, views: {module name: BaseView}) -> SharedTensors, built once per attached
    # adapter and passed to each of its layers as a fourth argument (VeRA's projections, Tied-LoRA's A/B)
    make_shared: Callable[..., Any] | None = None
    # typical learning rate relative to LoRA's; methods with very few parameters (IA3, VeRA) train at
    # 10-30x. Trainers, compare and the contract suite multiply their base learning rate by ``rate(config)``: this
    # number, or lr_scale(config) where a form of the method needs its own (prefix tuning with its encoder)
    lr_scale: float | Callable[..., float] = 1.0
    # optional: log_stats(model, adapter_name) -> {key: number or list}, read (and reset) at each
    # training log line and stored in the run's history (MoLoRA's expert usage)
    log_stats: Callable[..., dict] | None = None
    # optional: param_layer(config) -> the AdapterLayer class for nn.Parameter targets (PEFT's target_parameters,
    # core/params.py); None: the method adapts modules only
    param_layer: Callable[..., type] | None = None
    # optional: token_gate(config, input_ids, (B, T), cached, memory) -> a (B, T) bool gate or None, computed by the
    # pre-forward hook of each model call and set as ``layer.gate`` on the adapter's layers (aLoRA; core/hooks.py)
    token_gate: Callable[..., Any] | None = None
    # optional: data_init(model, config, batches, name) attaches the adapter with an initialisation computed from
    # batches of data, for configs whose layer class says ``init_needs_data`` (EVA, peftlab/eva.py); trainers call it
    data_init: Callable[..., Any] | None = None
    # optional: to_file(config, tensors) -> tensors and from_file(config, tensors) -> tensors, for a checkpoint that
    # holds some tensors in another form than the layers keep them (PEFT's per-method state-dict hooks: VBLoRA's
    # top-k indices and weights in place of its logits). Saving passes the live tensors through ``to_file``; loading
    # passes the file's tensors through ``from_file`` before checking keys and shapes. Both go by key suffix (keys
    # come with or without ``base_model.model.``), and ``from_file`` leaves tensors already in the live form as they
    # are (a training checkpoint's snapshot, an older file)
    to_file: Callable[..., dict] | None = None
    from_file: Callable[..., dict] | None = None

    def rate(self, config) -> float:
        """The learning-rate multiple for ``config`` (``lr_scale``, or its value for this config)."""
        return float(self.lr_scale(config) if callable(self.lr_scale) else self.lr_scale)

    def layer_class(self, config):
        return self.layer_factory(config) if self.layer_factory else self.layer

    def make_layer(self, view, config, module_name, shared=None):
        cls = self.layer_class(config)
        return cls(view, config, module_name) if shared is None else cls(view, config, module_name, shared)


_METHODS: dict[str, Method] = {}
_discovered = False


_VARIANTS: dict[str, tuple[str, Callable[..., AdapterConfig]]] = {}


def register(peft_type: str, config: type[AdapterConfig], layer: type | None = None, **kw: Any) -> Method:
    if peft_type in _METHODS and _METHODS[peft_type].config is not config:
        raise ValueError(f"peft_type {peft_type!r} registered twice")
    config.peft_type = peft_type
    method = Method(peft_type=peft_type, config=config, layer=layer, **kw)
    _METHODS[peft_type] = method
    if method.default_config is not None:
        _VARIANTS[peft_type.lower()] = (peft_type, method.default_config)
    return method


def register_variant(name: str, peft_type: str, default_config: Callable[..., AdapterConfig]) -> None:
    """A named setting of a registered method (e.g. "dora" = LORA with use_dora=True) for compare/CLI."""
    _VARIANTS[name.lower()] = (peft_type, default_config)


def variants() -> dict[str, Callable[..., AdapterConfig]]:
    """Method names usable as ``--method`` -> default_config(target_modules, r)."""
    _discover()
    return {name: factory for name, (_, factory) in sorted(_VARIANTS.items())}


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import peftlab.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def methods() -> dict[str, Method]:
    _discover()
    return dict(_METHODS)


def lookup(peft_type: str) -> Method:
    _discover()
    key = peft_type.upper()
    if key not in _METHODS:
        raise ConfigError(f"unknown peft_type {peft_type!r}; known: {sorted(_METHODS)}")
    return _METHODS[key]


def method_for(config: AdapterConfig) -> Method:
    return lookup(config.peft_type)


def config_from_dict(data: dict[str, Any], source: str = "config") -> AdapterConfig:
    if "peft_type" not in data:
        raise ConfigError(f"{source}: missing 'peft_type'")
    return lookup(str(data["peft_type"])).config.from_dict(data, source=source)
