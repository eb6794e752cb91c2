"""Adapter configs: dataclasses whose field names are those of PEFT's ``adapter_config.json``.

A config round-trips through ``to_dict``/``from_dict``. Unknown keys are an error that names them;
PEFT fields we do not implement are accepted only while they hold their neutral value, so a PEFT
checkpoint that relies on a feature we lack is refused instead of silently loaded wrong.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple


class ConfigError(ValueError):
    """A config field has a bad value or an unknown name."""


# Fields PEFT writes that carry no meaning for the adapter maths (bookkeeping only).
INFORMATIONAL_KEYS = frozenset(
    {"auto_mapping", "peft_version", "megatron_core", "revision", "inference_mode", "base_model_name_or_path",
     "task_type", "qalora_group_size"}
)


def _is_neutral(value: Any) -> bool:
    return value in (None, False, {}, [], "", 0)


class TokenRowsSpec(NamedTuple):
    """What ``AdapterConfig.trainable_tokens`` answers. ``spec``: a list of token ids (the input embedding) or
    {module name, suffix or regex: ids}; ``nested``: the rows are saved under ``token_adapter.`` (LoRA's
    ``trainable_token_indices``) or directly on the table (PEFT's TRAINABLE_TOKENS); ``init_weights``: they start as
    the table's rows, else standard normal; ``field``: the config field that error messages name."""

    spec: Any
    nested: bool = True
    init_weights: bool = True
    field: str = "trainable_token_indices"


@dataclass
class AdapterConfig:
    """Fields shared by every weight-attached method (PEFT's ``PeftConfig`` + tuner fields)."""

    peft_type: ClassVar[str] = ""
    # PEFT fields we do not implement, written with their neutral values so PEFT reads our files.
    peft_neutral_fields: ClassVar[dict[str, Any]] = {}
    # Fields above that PEFT's config class for this method lacks (IA3 has no layers_to_transform):
    # written only when set, so PEFT does not warn about unknown keys in our files.
    peft_absent_fields: ClassVar[frozenset[str]] = frozenset()

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = "CAUSAL_LM"
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.target_modules is None and self.requires_targets():
            raise ConfigError(f"{type(self).__name__}: target_modules is required (a list of names, a regex or 'all-linear')")
        self.validate()

    @classmethod
    def requires_targets(cls) -> bool:
        return True

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError naming the field."""

    def trainable_tokens(self) -> "TokenRowsSpec | None":
        """The embedding rows this adapter trains (core/tokens.py), or None."""
        spec = getattr(self, "trainable_token_indices", None)  # PEFT's field on LoraConfig
        return None if spec is None else TokenRowsSpec(spec)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.peft_neutral_fields)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.peft_absent_fields:
                continue
            out[f.name] = list(value) if isinstance(value, (set, tuple)) else value
        out["peft_type"] = self.peft_type
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "peft_type":
                if value != cls.peft_type:
                    raise ConfigError(f"{source}: peft_type {value!r} does not match {cls.__name__} ({cls.peft_type})")
            elif key in known:
                kwargs[key] = value
            elif key in INFORMATIONAL_KEYS or key in cls.peft_neutral_fields:
                if key in cls.peft_neutral_fields and not _is_neutral(value) and value != cls.peft_neutral_fields[key]:
                    raise ConfigError(f"{source}: PEFT option {key}={value!r} is not supported by peftlab's {cls.peft_type}")
            else:
                raise ConfigError(f"{source}: unknown config key {key!r} for {cls.__name__}")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def check_positive_int(name: str, value: Any) -> None:
    """Refuse anything but a positive int (bools too) for the config field ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_one_of(name: str, value: Any, choices: tuple) -> None:
    """A ConfigError naming ``name`` unless ``value`` is one of ``choices``; True / False / None match only
    themselves (so 1 is not True), strings by equality."""
    if not any(value is c if c is None or isinstance(c, bool) else (type(value) is type(c) and value == c)
               for c in choices):
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def list_field(default: list | None = None):
    return field(default_factory=lambda: list(default or []))


def dict_field():
    return field(default_factory=dict)


def check_number(name: str, value: Any) -> None:
    """Refuse anything but a finite int or float (bools too) for field ``name`` (scalings, bounds)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


SUPPORTED_BIAS = ("none", "all")


def check_bias(bias: str, only_name: str) -> None:
    """PEFT's bias options for methods without a bias of their own: "none", "all", or the method's "<x>_only" (the
    targeted layers' own biases train; core/inject.py handles every "_only" alike)."""
    if bias not in (*SUPPORTED_BIAS, only_name):
        raise ConfigError(f"bias must be one of {[*SUPPORTED_BIAS, only_name]}, got {bias!r}")


def check_dropout(name: str, value: float) -> None:
    """Refuse a dropout probability outside [0, 1) for the config field ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def sub_config(field_name: str, value: dict | None, defaults: dict, kind: str) -> dict:
    """A nested PEFT config given as a dict (``eva_config``, ``corda_config``): ``defaults`` with ``value``'s entries
    applied, refusing a non-dict and unknown keys by name (``kind``: PEFT's class name, for the message)."""
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise ConfigError(f"{field_name} must be a dict of {kind} fields, got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ConfigError(f"{field_name}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **value}
