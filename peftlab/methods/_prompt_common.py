"""Pieces shared by the prompt-learning methods (prompt.py, multitask_prompt.py, cpt.py, cartridge.py).

PEFT's ``PromptLearningConfig`` fields, the model dimensions PEFT reads at attach (embedding width, KV-cache
shape), the virtual-token and KV-prefix tables, and the token ids a prompt is initialised from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.input_side import HookedAdapter, HookMethod, text_config
from peftlab.ops import prefix_attention

TOP_LEVEL = ("prompt_embeddings",)


def positive_int(value, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class PromptLearningConfig(AdapterConfig):
    """PEFT's ``PromptLearningConfig`` fields; ``None`` dimensions are read from the model at attach."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    peft_absent_fields = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})

    @classmethod
    def requires_targets(cls) -> bool:
        return False

    def validate(self) -> None:
        positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            positive_int(getattr(self, name), name, optional=True)
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={self.num_transformer_submodules!r}: peftlab supports "
                              "decoder-only models (1)")
        for name in self.peft_absent_fields:
            if getattr(self, name) is not None:
                raise ConfigError(f"{type(self).__name__} takes no {name}: it adapts the input, not modules")


# -- model dimensions (PEFT's _prepare_prompt_learning_config) ---------------------------------
def _first(cfg, names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(f"cannot read {what} from the model config (tried {names}); set it in the adapter config")


def _check(config: PromptLearningConfig, field: str, model_value: int, why: str) -> int:
    given = getattr(config, field)
    if given is not None and given != model_value:
        raise ConfigError(f"{type(config).__name__}.{field}={given} does not fit the model ({why} is {model_value})")
    return model_value


def embedding_dim(model: nn.Module, config: PromptLearningConfig) -> int:
    dim = model.get_input_embeddings().weight.shape[1]
    return _check(config, "token_dim", dim, "the input embedding width")


def prefix_shape(model: nn.Module, config: PromptLearningConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of the model's KV cache."""
    cfg = text_config(model)
    layers = _check(config, "num_layers", _first(cfg, ("num_hidden_layers", "n_layer", "num_layers"), "layers"),
                    "the number of layers")
    heads = _first(cfg, ("num_attention_heads", "n_head", "num_heads"), "attention heads")
    hidden = _first(cfg, ("hidden_size", "n_embd", "d_model"), "hidden size")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    _check(config, "num_attention_heads", kv_heads, "the number of key/value heads")
    _check(config, "token_dim", kv_heads * head_dim, "key/value heads x head_dim")
    return layers, kv_heads, head_dim


# -- the adapters ------------------------------------------------------------------------------
class VirtualTable(HookedAdapter):
    """``n`` rows learned directly (``embedding``) or, while training a reparameterised form, computed
    by ``encoder(embedding)``. Saved as PEFT's ``prompt_embeddings``: the table the encoder computes."""

    def __init__(self, rows: int, width: int, make_encoder=None, embedding_width: int | None = None):
        super().__init__()
        # drawn as nn.Embedding draws it, and before the encoder: PEFT's order, so one seed gives PEFT's init
        self.embedding = nn.Parameter(torch.empty(rows, embedding_width or width).normal_())
        self.encoder = make_encoder() if make_encoder is not None else None
        self.rows_count = rows

    def rows(self, batch: int = 1) -> torch.Tensor:
        """(batch, n, width): the encoder run on ``batch`` copies of the embedding. One (batch * n)-row matmul
        rounds differently from an n-row one expanded (~5e-7 on CPU), and a high-lr run amplifies that into
        a different result (issue 6: prefix projection at lr 1e-3), so each subclass follows PEFT's choice."""
        table = self.embedding.unsqueeze(0)
        if batch > 1:  # (an expand to 1 would give the batch dim stride 0: another kernel path, other rounding)
            table = table.expand(batch, -1, -1)
        return table if self.encoder is None else self.encoder(table)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {"prompt_embeddings": self.embedding}
        # computed as in the forward (grad mode included: the LSTM's fused inference kernel rounds differently)
        return {"prompt_embeddings": self.rows()[0].detach()}


class VirtualTokens(VirtualTable):
    """Prompt tuning / P-tuning: rows prepended to the input embeddings."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_virtual_tokens = self.rows_count

    def virtual_tokens(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.rows(1).to(dtype).expand(batch, -1, -1)  # PEFT: one row through the encoder, repeated


class KVPrefix(VirtualTable):
    """Prefix tuning: row i holds, for every layer l, key (2l) and value (2l + 1) of virtual position i
    (PEFT's layout: (n, layers * 2 * kv_heads * head_dim))."""

    def __init__(self, shape: tuple[int, int, int], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shape = shape
        self.num_prefix_tokens = self.rows_count

    def configure(self, model: nn.Module) -> list:
        # the prefix sits in the KV cache before the queries: causal attention aligned to the bottom right, run
        # without the mask transformers' sdpa would build (ops/prefix_attention.py)
        return [prefix_attention.install(model)]

    @torch.no_grad()
    def load_rows(self, table: torch.Tensor) -> None:
        """Set the KV table (n, layers * 2 * kv_heads * head_dim) directly (a prefill's cache: kv_prefill.py)."""
        if self.encoder is not None:
            raise ValueError("a KV prefix computed by an encoder (prefix_projection=True) cannot be set from a cache: "
                             "its trained parameters are the encoder's, not the table")
        self._check_table(table)
        self.embedding.copy_(table)

    def _check_table(self, table: torch.Tensor) -> None:
        layers, heads, head_dim = self.shape
        want = (self.rows_count, layers * 2 * heads * head_dim)
        if tuple(table.shape) != want:
            raise ValueError(f"KV prefix table has shape {tuple(table.shape)}; this adapter takes {want} "
                             f"({self.rows_count} positions x {layers} layers x 2 x {heads} heads x {head_dim})")

    def write_prefix(self, cache, batch: int, dtype: torch.dtype) -> None:
        layers, heads, head_dim = self.shape  # PEFT runs the prefix encoder on every batch row
        kv = self.rows(batch).to(dtype).view(batch, self.rows_count, 2 * layers, heads, head_dim)
        kv = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 * layers of (batch, heads, n, head_dim)
        for layer in range(layers):  # unbind: one stack in backward, not a zero-filled table per select
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)


def prompt_init_ids(model: nn.Module, config) -> torch.Tensor:
    n = config.num_virtual_tokens
    vocab = model.get_input_embeddings().weight.shape[0]
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab, (n,))
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint's config must not run code
    ids = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to no tokens")
    return torch.tensor((ids * math.ceil(n / len(ids)))[:n])


@torch.no_grad()
def fill_from_vocabulary(table: torch.Tensor, model: nn.Module, config) -> None:
    """``table`` (n, d) := the input embeddings of the ids ``prompt_init_ids`` picks (TEXT / SAMPLE_VOCAB)."""
    embeddings = model.get_input_embeddings()
    table.copy_(embeddings(prompt_init_ids(model, config).to(embeddings.weight.device)).float())


def hooks(build, top_level_keys: tuple[str, ...] = TOP_LEVEL, folds_when_saving: bool = False,
          kv_prefill=None) -> HookMethod:
    return HookMethod(build, identity_at_init=False, top_level_keys=top_level_keys,
                      folds_when_saving=folds_when_saving, kv_prefill=kv_prefill)
