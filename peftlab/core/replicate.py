"""PEFT's ``layer_replication``: a deeper model from the base's own decoder layers, sharing their weights.

A map ``[[0, 4], [2, 5]]`` turns layers ``0..4`` into ``0 1 2 3 2 3 4``: each range ``[start, end)`` is appended in
order, a copy sharing every parameter and buffer with the layer it copies, so only the adapters (attached after,
to every copy) tell the copies apart. This is the layout PEFT builds before attaching, so its keys (indexed by the
new positions) load here and ours there. Each copy's ``layer_idx`` (transformers' key-value cache slot) is its new
position, and the model config's ``num_hidden_layers`` (and ``layer_types`` where the config has one) follow.

A merge must not write one copy's update into weights its twins share: ``unshare`` gives the modules about to be
merged weights of their own first, and ``materialize`` gives every copy its own tensors when the adapters are
unloaded, so an exported merged model is a plain deeper model.
"""
from __future__ import annotations

import copy

from torch import nn

from .blocks import decoder_stack
from .config import ConfigError

_FIELD = "layer_replication"


def _check_map(layer_map, n_layers: int) -> list[tuple[int, int]]:
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ConfigError(f"{_FIELD} must be a non-empty list of [start, end) pairs, got {layer_map!r}")
    pairs = []
    for pair in layer_map:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pair)
        if not ok or not 0 <= pair[0] < pair[1] <= n_layers:
            raise ConfigError(f"{_FIELD}: each entry must be [start, end) with 0 <= start < end <= {n_layers} (the "
                              f"base's decoder layers), got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters and buffers are the original's own objects."""
    memo = {id(t): t for t in (*layer.parameters(), *layer.buffers())}
    return copy.deepcopy(layer, memo)


def replicate_layers(model: nn.Module, layer_map, done) -> list[tuple[int, int]] | None:
    """Rebuild ``model``'s decoder stack from ``layer_map``; ``done`` is the map already applied (or None). Returns
    the map now in place. Checks everything before changing the model."""
    owner, attr, layers = decoder_stack(model)
    if done is not None:
        if [list(p) for p in layer_map] != [list(p) for p in done]:
            raise ConfigError(f"{_FIELD}={layer_map!r}, but this model's layers were already replicated with "
                              f"{done!r}; adapters on one model must share one layer map")
        return done
    pairs = _check_map(layer_map, len(layers))
    order = [i for start, end in pairs for i in range(start, end)]
    seen: set[int] = set()
    new_layers = []
    for position, source in enumerate(order):
        block = layers[source] if source not in seen else _shared_copy(layers[source])
        seen.add(source)
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = position
        new_layers.append(block)
    setattr(owner, attr, nn.ModuleList(new_layers))
    config = getattr(model, "config", None)
    if config is not None:
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in order]
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(new_layers)
    return pairs


def _own(module: nn.Module) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        if type(p) is not nn.Parameter:
            raise ConfigError(f"{_FIELD}: cannot give {type(module).__name__}.{name} ({type(p).__name__}) a copy of "
                              f"its own, so a merge would write into weights the replicated layers share")
        module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None:
            module._buffers[name] = b.clone()


def _shared_ids(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        counts[id(t)] = counts.get(id(t), 0) + 1
    return {key for key, n in counts.items() if n > 1}


def unshare(model: nn.Module, modules: list[nn.Module]) -> None:
    """Give each of ``modules`` (base layers about to take a merge) tensors that no other module holds."""
    shared = _shared_ids(model)
    for module in modules:
        if any(id(t) in shared for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            _own(module)


def materialize(model: nn.Module) -> None:
    """Every module of the replicated decoder stack with tensors of its own (a plain deeper model)."""
    unshare(model, [module for block in decoder_stack(model)[2] for module in block.modules()])
