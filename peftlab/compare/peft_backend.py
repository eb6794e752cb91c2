"""HF PEFT as a side-by-side backend for ``compare --with-peft``: same config dict, PEFT's code."""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

import peftlab


def _peft_config_class(peft_type: str):
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:
        return None
    return PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)


def peft_supports(variant: str) -> bool:
    """Whether HF PEFT is installed and has the method behind this variant name."""
    config = peftlab.variants()[variant](["q_proj"], 8)
    return _peft_config_class(config.peft_type) is not None


def to_peft_config(config: peftlab.AdapterConfig):
    """Our config as PEFT's config object (our field names are PEFT's)."""
    cls = _peft_config_class(config.peft_type)
    if cls is None:
        raise ValueError(f"HF PEFT has no {config.peft_type} method")
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in config.to_dict().items() if k in names and k != "peft_type"}
    return cls(**data)


def attach_with_peft(model: nn.Module, config: peftlab.AdapterConfig) -> tuple[nn.Module, Callable[[int], None]]:
    """Wrap ``model`` with HF PEFT; returns the PEFT model and its per-step hook (AdaLoRA's allocator)."""
    import peft

    peft_model = peft.get_peft_model(model, to_peft_config(config))
    inner = peft_model.base_model

    def step_end(step: int) -> None:
        if hasattr(inner, "update_and_allocate"):
            inner.update_and_allocate(step)

    return peft_model, step_end
