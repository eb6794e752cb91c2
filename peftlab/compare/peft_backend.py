"""HF PEFT as a side-by-side backend for ``compare --with-peft``: same config dict, PEFT's code."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
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


class PeftUnmapped(ValueError):
    """The installed PEFT cannot express this config: no such ``peft_type``, or a field it lacks holds a value
    that changes the method (so a PEFT run would not be the same method)."""


def to_peft_config(config: peftlab.AdapterConfig):
    """Our config as PEFT's config object (our field names are PEFT's). Fields PEFT's class lacks may only hold
    an empty / off value (None, False, 0, "", empty containers); anything else raises ``PeftUnmapped``."""
    import peft

    cls = _peft_config_class(config.peft_type)
    if cls is None:
        raise PeftUnmapped(f"peft {peft.__version__} has no peft_type {config.peft_type!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    lacking = {k: v for k, v in data.items() if k not in names and v not in (None, False, {}, [], "", 0)}
    if lacking:
        raise PeftUnmapped(f"peft {peft.__version__}'s {cls.__name__} lacks options {lacking}")
    return cls(**{k: v for k, v in data.items() if k in names})


# Task-conditioned methods (multitask prompt tuning's num_tasks, Poly's n_tasks): with one task peftlab reads a call
# without task_ids as task 0, while PEFT refuses it ("task_ids cannot be None"); the PEFT side gets task 0 explicitly.
SINGLE_TASK_FIELDS = {"num_tasks", "n_tasks"}


def _task_zero(module: nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("task_ids") is not None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"]
    return args, {**kwargs, "task_ids": torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)}


def attach_with_peft(model: nn.Module, config: peftlab.AdapterConfig, kv_table: torch.Tensor | None = None
                     ) -> tuple[nn.Module, Callable[[int], None]]:
    """Wrap ``model`` with HF PEFT; returns the PEFT model and its per-step hook (AdaLoRA's allocator).
    ``kv_table``: a KV prefix's start (the trainer's ``kv_prefix_init``), set through PEFT's own loader."""
    import peft

    peft_model = peft.get_peft_model(model, to_peft_config(config))
    if kv_table is not None:  # what PEFT's initialize_kv_prefix_from_past_key_values does with its table
        peft_model.prompt_encoder[peft_model.active_adapter].load_prompt_embeddings(kv_table)
    inner = peft_model.base_model
    if any(getattr(config, f, None) == 1 for f in SINGLE_TASK_FIELDS):
        peft_model.register_forward_pre_hook(_task_zero, with_kwargs=True)

    def step_end(step: int) -> None:
        if hasattr(inner, "update_and_allocate"):
            inner.update_and_allocate(step)

    return peft_model, step_end
