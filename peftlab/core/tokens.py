"""Trainable token rows (PEFT's ``trainable_token_indices``): chosen rows of an embedding table train, the rest
stay frozen, e.g. the rows of new chat-template tokens.

Each adapter keeps its rows as ``<embedding>.token_adapter.trainable_tokens_delta`` (n, hidden), PEFT's key for
LoRA's option, or ``<embedding>.trainable_tokens_delta`` for PEFT's standalone TRAINABLE_TOKENS method (``nested``
False; the tied head then saves the same tensor again at ``<head>.trainable_tokens_delta``, as PEFT does); in spite
of the name they hold the rows' values (a copy of the originals at the start), not differences. The lookup
gives row ``rows[k]`` for token ``indices[k]`` and the table's own row for every other token, without copying the
table. When the output head shares the table's weight (tied embeddings), the head's logits for those tokens use the
same rows, as PEFT's tied token adapter does.

Both wrappers are ``ModulesToSave`` to core: one per-adapter entry each, activated, frozen, deleted and saved by the
same code; ``unloaded`` writes the rows into the table (merge_and_unload).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import AdapterError, ModulesToSave


class _Rows(nn.Module):
    """One adapter's rows on the embedding, saved directly on it (PEFT's standalone TRAINABLE_TOKENS)."""

    def __init__(self, table: torch.Tensor, indices: list[int], init_weights: bool = True):
        super().__init__()
        self.indices = list(indices)
        rows = table.detach()[self.indices].clone() if init_weights else \
            torch.randn(len(self.indices), table.shape[1], dtype=table.dtype, device=table.device)
        self.trainable_tokens_delta = nn.Parameter(rows)

    @property
    def rows(self) -> "_Rows":
        return self


class _Entry(nn.Module):
    """What one adapter keeps on the embedding for LoRA's option: ``token_adapter`` (PEFT's key path) with its rows."""

    def __init__(self, table: torch.Tensor, indices: list[int], init_weights: bool = True):
        super().__init__()
        self.token_adapter = _Rows(table, indices, init_weights)

    @property
    def rows(self) -> _Rows:
        return self.token_adapter


class _TiedEntry(nn.Module):
    """The head's view of an embedding entry; holds no parameter of its own (not saved twice)."""

    def __init__(self, entry: nn.Module):
        super().__init__()
        self._source = [entry]

    @property
    def rows(self) -> _Rows:
        return self._source[0].rows


class _TiedRows(_TiedEntry):
    """The head's view for the standalone method: the embedding's parameter registered here too, so it is saved at
    ``<head>.trainable_tokens_delta`` as PEFT saves it (one tensor: the model counts and trains it once)."""

    def __init__(self, entry: _Rows):
        super().__init__(entry)
        self.trainable_tokens_delta = entry.trainable_tokens_delta


def check_indices(indices, vocab: int, where: str, field: str = "trainable_token_indices") -> list[int]:
    if not isinstance(indices, (list, tuple)) or not indices or not all(isinstance(i, int) for i in indices):
        raise AdapterError(f"{field} for {where!r} must be a non-empty list of token ids, "
                           f"got {indices!r}")
    bad = [i for i in indices if not 0 <= i < vocab]
    if bad or len(set(indices)) != len(indices):
        raise AdapterError(f"{field} for {where!r}: ids {bad or 'repeated'} "
                           f"(the table has {vocab} rows; each id once)")
    return list(indices)


def wrappable(module: nn.Module) -> bool:
    """A plain ``nn.Embedding``, or one whose forward multiplies by its ``embed_scale`` (Gemma 3's scaled table)."""
    return type(module) is nn.Embedding or (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale"))


class TokenRows(ModulesToSave):
    """An ``nn.Embedding`` whose adapter-chosen rows train."""

    def __init__(self, original: nn.Module):
        if not wrappable(original):
            raise AdapterError(f"trainable tokens wrap an nn.Embedding (optionally with an embed_scale), not "
                               f"{type(original).__name__}")
        super().__init__(original)

    def add(self, name: str, indices: list[int], nested: bool = True,  # type: ignore[override]
            init_weights: bool = True) -> None:
        self.modules_to_save[name] = (_Entry if nested else _Rows)(self.original_module.weight, indices, init_weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.original_module(ids)
        if self.disabled or self.active not in self.modules_to_save:
            return out
        rows = self.modules_to_save[self.active].rows
        position = torch.full((self.original_module.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        position[rows.indices] = torch.arange(len(rows.indices), device=ids.device)
        pos = position[ids]
        picked = F.embedding(pos.clamp(min=0), rows.trainable_tokens_delta)
        scale = getattr(self.original_module, "embed_scale", None)
        if scale is not None:  # as the table's own forward scales its rows
            picked = picked * scale.to(self.original_module.weight.dtype)
        picked = picked.to(out.dtype)
        return torch.where((pos >= 0).unsqueeze(-1), picked, out)

    def unloaded(self, name: str | None) -> nn.Module:
        if name is not None:
            rows = self.modules_to_save[name].rows
            weight = self.original_module.weight
            with torch.no_grad():
                weight.index_copy_(0, torch.tensor(rows.indices, device=weight.device),
                                   rows.trainable_tokens_delta.detach().to(weight.dtype))
        return self.original_module


class TiedTokenHead(ModulesToSave):
    """The output head of a tied model: the logits of the trainable tokens come from the embedding's rows."""

    def add(self, name: str, entry: nn.Module) -> None:  # type: ignore[override]
        self.modules_to_save[name] = _TiedRows(entry) if isinstance(entry, _Rows) else _TiedEntry(entry)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.original_module(hidden)
        if self.disabled or self.active not in self.modules_to_save:
            return out
        rows = self.modules_to_save[self.active].rows
        index = torch.tensor(rows.indices, device=out.device)
        bias = self.original_module.bias
        logits = F.linear(hidden, rows.trainable_tokens_delta.to(hidden.dtype),
                          None if bias is None else bias[index].to(hidden.dtype)).to(out.dtype)
        return out.index_copy(-1, index, logits)

    def unloaded(self, name: str | None) -> nn.Module:
        return self.original_module  # the table it shares gets the rows from TokenRows.unloaded


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    from .inject import logical_modules

    return next((n for n, m in logical_modules(model) if m is module), None)


def token_plan(model: nn.Module, spec, taken: list[str], field: str = "trainable_token_indices",
               ) -> list[tuple[str, list[int], str | None]]:
    """(embedding name, indices, tied head name or None) for each table ``spec`` names, all checked before anything
    changes. ``spec``: a list of token ids (the input embedding), or {module name: ids}. ``taken``: the new
    adapter's modules_to_save and weight targets, which must not be among them. ``field``: the config field that
    errors name."""
    from .adapter import AdaptedModule
    from .inject import _unwrap, logical_modules

    if isinstance(spec, (list, tuple)):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        where = _name_of(model, emb) if emb is not None else None
        if where is None:
            raise AdapterError(f"{field} as a list needs a model with get_input_embeddings()")
        targets = {where: spec}
    elif isinstance(spec, dict):
        targets = {}
        for key, ids in spec.items():
            names = [n for n, _ in logical_modules(model)]
            hits = [n for n in names if n == key or n.endswith("." + key)] or \
                [n for n in names if re.fullmatch(key, n)]  # a name, a name's suffix, or a regex of whole names
            if len(hits) != 1:
                raise AdapterError(f"{field} key {key!r} matches {len(hits)} modules; name one")
            targets[hits[0]] = ids
    else:
        raise AdapterError(f"{field} must be a list of ids or {{module: ids}}, got {spec!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plan = []
    for where, ids in targets.items():
        module = model.get_submodule(where)
        if isinstance(module, AdaptedModule) or (isinstance(module, ModulesToSave) and not isinstance(module, TokenRows)):
            raise AdapterError(f"{where!r} is already adapted or in modules_to_save; trainable tokens need it plain")
        if any(where == s or where.endswith("." + s) for s in taken):
            raise AdapterError(f"{where!r} is both a target or in modules_to_save and in {field}; "
                               "pick one")
        base = _unwrap(module)
        if not wrappable(base):
            raise AdapterError(f"{field}: {where!r} is a {type(base).__name__}, not an nn.Embedding")
        ids = check_indices(ids, base.num_embeddings, where, field)
        tied = None
        if head is not None and getattr(_unwrap(head), "weight", None) is base.weight:
            tied = _name_of(model, head)
            if tied in targets:
                raise AdapterError(f"{tied!r} shares {where!r}'s weight and follows its trainable tokens; "
                                   "name only the embedding")
            if isinstance(head, ModulesToSave) and not isinstance(head, TiedTokenHead):
                raise AdapterError(f"{tied!r} is in modules_to_save but shares {where!r}'s weight")
        plan.append((where, ids, tied))
    return plan


def add_trainable_tokens(model: nn.Module, plan, name: str, nested: bool = True, init_weights: bool = True) -> None:
    """Wrap each planned table (and its tied head) and add adapter ``name``'s rows; ``nested``: saved under
    ``token_adapter.`` (LoRA's option) or directly on the table (the standalone method), see the module docstring."""
    from .inject import _set_submodule

    for where, ids, tied in plan:
        module = model.get_submodule(where)
        if not isinstance(module, TokenRows):
            module = TokenRows(module)
            _set_submodule(model, where, module)
        module.add(name, ids, nested, init_weights)
        if tied is not None:
            head = model.get_submodule(tied)
            if not isinstance(head, TiedTokenHead):
                head = TiedTokenHead(head)
                _set_submodule(model, tied, head)
            head.add(name, module.modules_to_save[name])
