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

    def make_layer(self, view, config, module_name):
        cls = self.layer_factory(config) if self.layer_factory else self.layer
        return cls(view, config, module_name)


_METHODS: dict[str, Method] = {}
_discovered = False


def register(peft_type: str, config: type[AdapterConfig], layer: type | None = None, **kw: Any) -> Method:
    if peft_type in _METHODS and _METHODS[peft_type].config is not config:
        raise ValueError(f"peft_type {peft_type!r} registered twice")
    config.peft_type = peft_type
    method = Method(peft_type=peft_type, config=config, layer=layer, **kw)
    _METHODS[peft_type] = method
    return method


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
