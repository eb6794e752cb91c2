"""Trainable tokens (PEFT's TRAINABLE_TOKENS tuner): only the chosen rows of an embedding table train.

    E'[t] = R[k]  if t = token_indices[k],   E'[t] = E[t] otherwise

``trainable_tokens_delta``: R (len(token_indices), hidden), saved at ``<embedding>.trainable_tokens_delta``; in spite
of the name it holds the rows' values, which start as a copy of E's rows (``init_weights=False``: standard normal). A
head tied to the table gives those tokens' logits from R, and R is saved again at ``<head>.trainable_tokens_delta``,
as PEFT saves it. The machinery is core's (core/tokens.py), shared with LoRA's ``trainable_token_indices``; this file
only declares the method: a layer class that wraps no module (empty ``supported_kinds``) and carries the flags, and
a config that says which rows through ``AdapterConfig.trainable_tokens``. ``target_modules`` None targets the
model's input embedding, as PEFT does; names match by suffix, a string also as a regex of whole names. Merging
writes R into E (merge_and_unload).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from peftlab.core.adapter import AdapterLayer
from peftlab.core.config import AdapterConfig, ConfigError, TokenRowsSpec
from peftlab.core.registry import register


@dataclass
class TrainableTokensConfig(AdapterConfig):
    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    # PeftConfig's fields only: PEFT's TrainableTokensConfig has no layer selection and no modules_to_save
    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"})

    @classmethod
    def requires_targets(cls) -> bool:
        return False

    def validate(self) -> None:
        ids = self.token_indices
        if not isinstance(ids, (list, tuple)) or not ids \
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"token_indices must be a non-empty list of token ids (ints >= 0), got {ids!r}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"token_indices must name each token once, got {ids!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ConfigError(f"target_modules must be None, a name / regex or a list of names, "
                              f"got {self.target_modules!r}")
        for name in sorted(self.peft_absent_fields):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not an option of TRAINABLE_TOKENS (PEFT's "
                                  "TrainableTokensConfig has no such field)")

    def trainable_tokens(self) -> TokenRowsSpec:
        ids = list(self.token_indices)
        if self.target_modules is None:
            return TokenRowsSpec(ids, nested=False, init_weights=self.init_weights, field="token_indices")
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        return TokenRowsSpec({name: ids for name in names}, nested=False, init_weights=self.init_weights,
                             field="target_modules / token_indices")


class TrainableTokensLayer(AdapterLayer):
    """Never built: the rows live in core's token wrappers. Mergeable (merge_and_unload writes them into the table),
    not served (the servers refuse trainable tokens by config)."""

    supported_kinds = frozenset()
    identity_at_init = True  # with init_weights=True (PEFT's default); False draws the rows at random


register("TRAINABLE_TOKENS", TrainableTokensConfig, TrainableTokensLayer,
         # the contract's linear target names do not apply; the tiny models' first 64 ids past the specials train
         default_config=lambda target_modules, r=8: TrainableTokensConfig(token_indices=list(range(3, 67))),
         # the rows are full embedding vectors trained directly, like modules_to_save: LoRA's rate suits them
         lr_scale=1.0)
