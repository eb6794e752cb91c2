"""Statistics of linear targets' inputs over batches of data, shared by the data-driven LoRA inits (EVA: mean and
scatter, peftlab/eva.py; CorDA: per-sequence covariance, peftlab/corda.py), and the hand-over of what such a pass
computed to the layers being attached.

``collect_inputs`` runs the bare base (other adapters off, eval mode, no grad) over the batches with a forward hook on
each named module; each hook gives its statistic the module's input (B, T, features) with the (B, T) mask of counted
tokens. A module called with the very tensor the previous hooked one was (q/k/v) shares that one's statistic.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch

from peftlab.core.adapter import AdapterError
from peftlab.core.config import ConfigError
from peftlab.core.inject import disabled


def token_mask(batch: dict, use_label_mask: bool = False, label_mask_value: int = -100) -> torch.Tensor:
    """(B, T) bool: the tokens counted: not padding, and with ``use_label_mask`` not labelled ``label_mask_value``."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if use_label_mask and batch.get("labels") is not None:
        mask = mask & (batch["labels"] != label_mask_value)
    return mask


def as_batch(item, device: torch.device) -> dict:
    """A dict of input_ids (and optionally attention_mask, labels) on ``device``, from a dict or an ids tensor."""
    if isinstance(item, torch.Tensor):
        item = {"input_ids": item}
    if not isinstance(item, Mapping) or "input_ids" not in item:  # a dict, a tokenizer's BatchEncoding
        raise ConfigError(f"batches: each batch must be a dict with 'input_ids' (and optionally 'attention_mask', "
                          f"'labels') or an input_ids tensor, got {type(item).__name__}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}


def collect_inputs(model: torch.nn.Module, names: list[str], batches: Iterable, make_stat: Callable[[], object],
                   mask_fn: Callable[[dict], torch.Tensor], who: str) -> dict:
    """{name: statistic}: ``make_stat()`` per distinct input, fed ``stat.add(x, mask)`` at each call of the module
    during a pass of the bare base over ``batches``. ``who`` names the init in errors."""
    stats: dict[str, object] = {}
    alias: dict[str, str] = {}
    current: dict = {"mask": None, "last": (None, None)}

    def hook(module, args, output, name):
        x = args[0]
        if x is current["last"][0]:
            alias[name] = current["last"][1]
            return
        current["last"] = (x, name)
        mask = current["mask"]
        if x.shape[:-1] != mask.shape:
            raise AdapterError(f"{who}: the input of {name!r} has shape {tuple(x.shape)}, not (batch, tokens, "
                               f"features) of the batch's {tuple(mask.shape)} tokens")
        if name not in stats:
            stats[name] = make_stat()
        stats[name].add(x, mask)

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    device = next(model.parameters()).device
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), disabled(model):
            for item in batches:
                batch = as_batch(item, device)
                current["mask"], current["last"] = mask_fn(batch), (None, None)
                model(**{k: v for k, v in batch.items() if k != "labels"})
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ConfigError(f"batches: no batches given; {who} needs the targets' inputs on some data")
    missing = [n for n in names if n not in stats and n not in alias]
    if missing:
        raise ConfigError(f"{who}: targets {missing[:3]} were not called during the pass over the batches")
    return {n: stats[alias.get(n, n)] for n in names}


_SUPPLIED: list[tuple[str, dict]] = []


@contextmanager
def supplying(init: str, values: dict) -> Iterator[None]:
    """While attaching: what a data pass computed per module for init ``init``, read by the layers (``supplied``)."""
    _SUPPLIED.append((init, values))
    try:
        yield
    finally:
        _SUPPLIED.pop()


def supplied(init: str, module_name: str, entry_point: str):
    """The value supplied for ``module_name`` by the innermost ``supplying(init, ...)``; refused outside it."""
    if not _SUPPLIED or _SUPPLIED[-1][0] != init or module_name not in _SUPPLIED[-1][1]:
        raise AdapterError(f"init_lora_weights={init!r} on {module_name!r}: this initialisation comes from data; "
                           f"attach with {entry_point} (peftlab train does this) or load a saved adapter")
    return _SUPPLIED[-1][1][module_name]
