"""Cartridges (Eyuboglu et al. 2025): a trained KV cache, in PEFT's ``CARTRIDGE`` checkpoint format.

As prefix tuning without a reparameterisation: per layer l, keys and values K_l, V_l of n virtual positions are
parameters, placed in the KV cache before the caller's tokens, ``attn_l(x) = softmax(q [K_l; k(x)]^T) [V_l; v(x)]``.
The first ``num_frozen_tokens`` positions (an attention sink, 1 by default) are kept frozen: a buffer, never
trained. Both parts start at N(0, 1), frozen rows drawn first (PEFT's order, so one seed gives PEFT's values).
The paper's initialisation from the first tokens of a corpus (PEFT's ``initialize_kv_prefix_*`` utilities, a step
after attaching) is ``peftlab.kv_prefill`` (``peftlab train --kv-prefix-init data``; compare's default).

Saved key (top level, as PEFT): ``prompt_embeddings`` (n, layers * 2 * kv_heads * head_dim), the frozen rows then
the trained ones (layout as prefix tuning's); it is split by ``num_frozen_tokens`` on loading.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.core.config import ConfigError
from peftlab.core.registry import register
from peftlab.methods._prompt_common import KVPrefix, PromptLearningConfig, hooks, prefix_shape

_LIVE = ("frozen_embedding", "trainable_embedding")


@dataclass
class CartridgeConfig(PromptLearningConfig):
    num_frozen_tokens: int = 1

    def validate(self) -> None:
        super().validate()
        frozen = self.num_frozen_tokens
        if not isinstance(frozen, int) or isinstance(frozen, bool) or frozen < 0:
            raise ConfigError(f"num_frozen_tokens must be an integer >= 0, got {frozen!r}")
        if frozen > self.num_virtual_tokens:
            raise ConfigError(f"num_frozen_tokens={frozen} exceeds num_virtual_tokens={self.num_virtual_tokens}")


class Cartridge(KVPrefix):
    """``frozen_embedding`` (a buffer: set_active never makes it trainable) and the trained ``embedding``."""

    def __init__(self, shape: tuple[int, int, int], rows: int, width: int, frozen: int):
        frozen_rows = torch.empty(frozen, width).normal_()  # drawn before the trained rows, as PEFT
        super().__init__(shape, rows - frozen, width)
        self.register_buffer("frozen_embedding", frozen_rows)
        self.num_prefix_tokens = self.rows_count = rows

    def rows(self, batch: int = 1) -> torch.Tensor:
        table = torch.cat([self.frozen_embedding, self.embedding]).unsqueeze(0)
        return table.expand(batch, -1, -1) if batch > 1 else table

    @torch.no_grad()
    def load_rows(self, table: torch.Tensor) -> None:
        """The first ``num_frozen_tokens`` rows of ``table`` into the frozen buffer, the rest into the trained rows."""
        self._check_table(table)
        frozen = self.frozen_embedding.shape[0]
        self.frozen_embedding.copy_(table[:frozen])
        self.embedding.copy_(table[frozen:])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"frozen_embedding": self.frozen_embedding, "trainable_embedding": self.embedding}


def to_file(config: CartridgeConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rest = {k: v for k, v in tensors.items() if k not in _LIVE}
    return {**rest, "prompt_embeddings": torch.cat([tensors[k] for k in _LIVE if k in tensors])}


def from_file(config: CartridgeConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "prompt_embeddings" not in tensors:  # already in the live form
        return tensors
    rest = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
    table, frozen = tensors["prompt_embeddings"], config.num_frozen_tokens
    return {**rest, "frozen_embedding": table[:frozen], "trainable_embedding": table[frozen:]}


def build(model, config: CartridgeConfig) -> Cartridge:
    shape = prefix_shape(model, config)
    layers, heads, head_dim = shape
    return Cartridge(shape, config.num_virtual_tokens, layers * 2 * heads * head_dim, config.num_frozen_tokens)


# as prefix tuning's table: trained directly, 30x (default compare, from a prefill of the first training tokens: 3x
# 4.1655, 10x 4.0242, 30x 3.7530, 100x 3.6653; base model 4.2587; bench/results/compare/lr_probe/probe_kv_prefill.md)
register("CARTRIDGE", CartridgeConfig, kind="input", lr_scale=30.0, to_file=to_file, from_file=from_file,
         input_hooks=hooks(build, top_level_keys=_LIVE, kv_prefill=lambda config: True),
         default_config=lambda target_modules=None, r=8: CartridgeConfig(num_virtual_tokens=r))
