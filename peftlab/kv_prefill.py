"""A KV prefix (prefix tuning without its encoder, Cartridges) initialised from a prefill of the base model.

Random N(0, 1) keys and values (PEFT's default) start far from anything the model's attention has seen: in the
default comparison both methods ended well above the base model's eval loss. Both papers start from real activations
instead (Li & Liang 2021: the activations of real words; Eyuboglu et al. 2025: the KV cache of the corpus's first
tokens, with the first position, the attention sink, frozen). As PEFT's ``initialize_kv_prefix_from_text`` /
``_from_past_key_values``, this is a step after attaching: run the bare base model on some tokens with a cache, and
copy the first n cached positions of every layer into the adapter's table (PEFT's layout: row i holds, for every layer
l, key (2l) and value (2l + 1) of position i). The keys carry their rotary phase for positions 0..n-1, where the
prefix sits in every later call.

``peftlab train --kv-prefix-init data`` prefills the first training examples' tokens (their padding dropped, joined
until there are n); ``--kv-prefix-text TEXT`` a given text. ``compose`` (``peftlab compose``) concatenates saved
tables into one adapter, the paper's composition.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftlab.core.config import ConfigError

DATA = "data"


def table_from_cache(cache, n: int) -> torch.Tensor:
    """(n, layers * 2 * kv_heads * head_dim) from a batch-1 cache: a transformers ``Cache`` (``.layers[l].keys``)
    or the legacy tuple of (key, value) per layer, each (1, kv_heads, length, head_dim)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif isinstance(cache, (tuple, list)):
        pairs = [tuple(kv) for kv in cache]
    else:
        raise TypeError(f"expected a transformers Cache or a tuple of (key, value) per layer, got {type(cache).__name__}")
    if not pairs:
        raise ValueError("the cache has no layers")
    rows = []
    for index, (keys, values) in enumerate(pairs):
        for what, t in (("key", keys), ("value", values)):
            if t is None or t.dim() != 4 or t.shape[0] != 1:
                raise ValueError(f"layer {index}'s cached {what} has shape "
                                 f"{None if t is None else tuple(t.shape)}; expected (1, heads, length, head_dim)")
            if t.shape[2] < n:
                raise ValueError(f"layer {index}'s cache holds {t.shape[2]} positions; the prefix needs {n}")
            first = pairs[0][0]
            if (t.shape[1], t.shape[3]) != (first.shape[1], first.shape[3]):
                raise ValueError(f"layer {index}'s cached {what} has shape {tuple(t.shape)}: other heads or head_dim "
                                 f"than layer 0's key {tuple(first.shape)}")
            rows.append(t[0, :, :n].transpose(0, 1))  # (n, heads, head_dim)
    return torch.stack(rows, dim=1).reshape(n, -1)  # (n, 2 * layers, heads, head_dim) flattened per position


def is_kv_table(config) -> bool:
    """Whether the adapter this config builds is a KV table a prefill can set (the hook method's ``kv_prefill``)."""
    from peftlab.core.registry import method_for

    hooks = method_for(config).input_hooks
    return hooks is not None and hooks.kv_prefill(config)


def _adapter(model: nn.Module, name: str | None):
    from peftlab.core.input_side import hooked
    from peftlab.core.state import model_state

    configs = model_state(model).configs
    if name is None:
        if len(configs) != 1:
            raise ValueError(f"the model has adapters {list(configs)}; name the KV prefix to set")
        name = next(iter(configs))
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; have {list(configs)}")
    config = configs[name]
    if not is_kv_table(config):
        raise ConfigError(f"adapter {name!r} ({type(config).__name__}) is not a KV table a prefill can set: only "
                          "prefix tuning without prefix_projection and Cartridges are")
    return hooked(model)[name]


def init_from_cache(model: nn.Module, cache, name: str | None = None) -> torch.Tensor:
    """Set adapter ``name``'s KV table from the first positions of ``cache``; returns the table."""
    adapter = _adapter(model, name)
    table = table_from_cache(cache, adapter.rows_count)
    _load(adapter, table)
    return table


@torch.no_grad()
def table_from_ids(model: nn.Module, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Prefill the bare base model (peftlab's adapters off) on the first ``n`` of ``input_ids`` (one sequence, (T,) or
    (1, T)); returns the (n, layers * 2 * kv_heads * head_dim) table of its cache."""
    from peftlab.core.inject import disabled

    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence, got shape {tuple(input_ids.shape)}")
    if ids.shape[1] < n:
        raise ValueError(f"{ids.shape[1]} tokens to prefill; the prefix has {n} positions")
    device = next(model.parameters()).device
    ids = ids[:, :n].to(device)
    was_training = model.training
    model.eval()
    try:
        with disabled(model):
            output = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no KV cache for a prefill with use_cache=True")
    return table_from_cache(cache, n)


def init_from_ids(model: nn.Module, input_ids: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Set adapter ``name``'s KV table from a prefill of ``input_ids``; returns the table."""
    adapter = _adapter(model, name)
    table = table_from_ids(model, input_ids, adapter.rows_count)
    _load(adapter, table)
    return table


def init_from_text(model: nn.Module, tokenizer, text: str, name: str | None = None) -> torch.Tensor:
    """Prefill the tokens of ``text`` (the tokenizer's special tokens included)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return init_from_ids(model, ids, name)


def ids_from_batches(batches, n: int) -> torch.Tensor:
    """The first ``n`` tokens of collated training batches: each example's tokens (attention mask 1) in order."""
    parts, have = [], 0
    for batch in batches:
        mask = batch.get("attention_mask")
        for row, ids in enumerate(batch["input_ids"]):
            kept = ids if mask is None else ids[mask[row].bool()]
            parts.append(kept)
            have += kept.numel()
            if have >= n:
                return torch.cat(parts)[:n]
    raise ValueError(f"the training data has {have} tokens in its first batches; the KV prefix needs {n}")


def check_args(mode: str | None, text: str | None, config=None) -> None:
    """``--kv-prefix-init`` / ``--kv-prefix-text``: a known mode, not both, and (given the config) a method that
    has a KV table to set."""
    if mode not in (None, DATA):
        raise ConfigError(f"kv_prefix_init must be None or {DATA!r}, got {mode!r}")
    if mode is not None and text is not None:
        raise ConfigError("kv_prefix_init and kv_prefix_text both given; choose one")
    if (mode is not None or text is not None) and config is not None:
        if not is_kv_table(config):
            raise ConfigError(f"kv_prefix_init / kv_prefix_text: {type(config).__name__} has no KV table to set from a "
                              "prefill (prefix tuning without prefix_projection and Cartridges have)")


def table_for_args(model: nn.Module, tokenizer, config, mode: str | None, text: str | None, batches):
    """The trainer's ``kv_prefix_init="data"`` / ``kv_prefix_text``: the table to start ``config``'s adapter from,
    computed on the base model before attaching (so both compare backends get the same one); None when neither is
    set."""
    if mode is None and text is None:
        return None
    check_args(mode, text, config)
    n = config.num_virtual_tokens
    ids = tokenizer(text, return_tensors="pt")["input_ids"] if text is not None else ids_from_batches(batches(), n)
    return table_from_ids(model, ids, n)


def load_table(model: nn.Module, name: str, table: torch.Tensor) -> None:
    _load(_adapter(model, name), table)


def _load(adapter, table: torch.Tensor) -> None:
    adapter.load_rows(table.to(device=adapter.embedding.device, dtype=adapter.embedding.dtype))


# -- composition (the Cartridges paper's: concatenate trained tables) -----------------------------
_SAME = ("peft_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


def compose(folders, out) -> object:
    """Concatenate the KV tables of saved adapters (Cartridges, or prefix tuning without its encoder) into one adapter
    at ``out``: positions of the first, then the second, ... (PEFT's ``compose_cartridge_adapters``). The model
    dimensions must agree; a Cartridge keeps the first adapter's ``num_frozen_tokens``. Written atomically, safetensors
    only; returns the new config."""
    from peftlab.core.state import CheckpointError, read_adapter_weights, read_config, staged_dir, write_adapter_files

    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ValueError(f"compose needs at least 2 adapters, got {len(folders)}")
    configs = [read_config(f) for f in folders]
    tables = []
    for folder, config in zip(folders, configs):
        if not is_kv_table(config):
            raise ConfigError(f"{folder}: {type(config).__name__} is not a KV table (Cartridges and prefix tuning "
                              "without prefix_projection are)")
        for key in _SAME:
            if getattr(config, key, None) != getattr(configs[0], key, None):
                raise ConfigError(f"{folder}: {key}={getattr(config, key, None)!r} differs from {folders[0]}'s "
                                  f"{getattr(configs[0], key, None)!r}")
        weights = read_adapter_weights(folder)
        if set(weights) != {"prompt_embeddings"}:
            raise CheckpointError(f"{folder}: expected one tensor 'prompt_embeddings', found {sorted(weights)}")
        table = weights["prompt_embeddings"]
        if table.dim() != 2 or table.shape[0] != config.num_virtual_tokens:
            raise CheckpointError(f"{folder}: prompt_embeddings has shape {tuple(table.shape)}; its config says "
                                  f"{config.num_virtual_tokens} positions")
        if tables and table.shape[1] != tables[0].shape[1]:
            raise CheckpointError(f"{folder}: prompt_embeddings rows are {table.shape[1]} wide, {folders[0]}'s "
                                  f"{tables[0].shape[1]}")
        tables.append(table)
    composed = torch.cat(tables)
    config = configs[0].replace(num_virtual_tokens=composed.shape[0])
    with staged_dir(out) as tmp:
        write_adapter_files(tmp, {"prompt_embeddings": composed}, config.to_dict())
    return config
