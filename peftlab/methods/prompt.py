"""Prompt learning: prompt tuning, prefix tuning and P-tuning, in PEFT's checkpoint format.

All three learn ``n`` virtual positions and leave every base weight untouched; they act through the
model-level hook of ``peftlab.core.input_side`` (virtual tokens / KV prefix, mask, positions, labels).

* Prompt tuning (Lester et al. 2021): ``n`` trainable embeddings P (n, d) prepended to the input,
  ``h_0 = [P; E x]``. Initialised at random (N(0, 1), as PEFT), from the embeddings of a text
  (``prompt_tuning_init="TEXT"``) or of random vocabulary tokens (``"SAMPLE_VOCAB"``).
* P-tuning (Liu et al. 2021): the same prepended prompt, reparameterised while training as
  ``P = MLP(E_v)`` (Linear-ReLU-Linear-ReLU-Linear) or ``P = MLP(BiLSTM(E_v))`` over trainable E_v.
* Prefix tuning (Li & Liang 2021): per layer l, trainable keys and values K_l, V_l (n heads x head_dim,
  the KV heads under grouped-query attention) placed in the KV cache before the caller's tokens, so
  ``attn_l(x) = softmax(q [K_l; k(x)]^T / sqrt(d)) [V_l; v(x)]``. With ``prefix_projection`` the table
  is ``MLP(E_v)`` (Linear-Tanh-Linear) while training.

Checkpoints hold PEFT's single top-level ``prompt_embeddings``: the table itself, and for the
reparameterised forms the table the encoder computes (folded when saving; the encoder is not saved).
A saved config has ``inference_mode=True``, so loading builds the plain table, as PEFT does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.input_side import HookedAdapter, HookMethod, text_config
from peftlab.core.registry import register, register_variant

_TOP_LEVEL = ("prompt_embeddings",)
_PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


def _positive_int(value, name: str, optional: bool = False) -> None:
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
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_int(getattr(self, name), name, optional=True)
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={self.num_transformer_submodules!r}: peftlab supports "
                              "decoder-only models (1)")
        for name in self.peft_absent_fields:
            if getattr(self, name) is not None:
                raise ConfigError(f"{type(self).__name__} takes no {name}: it adapts the input, not modules")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in _PROMPT_INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {_PROMPT_INITS}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ConfigError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                              f"got {self.encoder_reparameterization_type!r}")
        _positive_int(self.encoder_hidden_size, "encoder_hidden_size", optional=True)
        _positive_int(self.encoder_num_layers, "encoder_num_layers")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        _positive_int(self.encoder_hidden_size, "encoder_hidden_size", optional=True)
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


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


def _embedding_dim(model: nn.Module, config: PromptLearningConfig) -> int:
    dim = model.get_input_embeddings().weight.shape[1]
    return _check(config, "token_dim", dim, "the input embedding width")


def _prefix_shape(model: nn.Module, config: PrefixTuningConfig) -> tuple[int, int, int]:
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


# -- encoders (reparameterisations used while training) ----------------------------------------
class MLP(nn.Module):
    """Linear maps with an activation between them; weights kept as raw parameters (see input_side)."""

    def __init__(self, dims: list[int], activation):
        super().__init__()
        self.activation = activation
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(dims, dims[1:]):
            weight, bound = torch.empty(fan_out, fan_in), 1 / math.sqrt(fan_in)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.empty(fan_out).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = F.linear(x, weight, bias)
            if i < len(self.weights) - 1:
                x = self.activation(x)
        return x

    @torch.no_grad()
    def zero_last(self) -> None:
        self.weights[-1].zero_()
        self.biases[-1].zero_()


class LSTMEncoder(nn.Module):
    """P-tuning's LSTM head: a bidirectional LSTM, then Linear-ReLU-Linear."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.head = MLP([2 * hidden, 2 * hidden, dim], F.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


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

    def write_prefix(self, cache, batch: int, dtype: torch.dtype) -> None:
        layers, heads, head_dim = self.shape  # PEFT runs the prefix encoder on every batch row
        kv = self.rows(batch).to(dtype).view(batch, self.rows_count, 2 * layers, heads, head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2 * layers, batch, heads, n, head_dim)
        for layer in range(layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)


def _prompt_init_ids(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
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


def build_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> VirtualTokens:
    adapter = VirtualTokens(config.num_virtual_tokens, _embedding_dim(model, config))
    if config.prompt_tuning_init != "RANDOM" and not config.inference_mode:  # loading: the checkpoint fills it
        embeddings = model.get_input_embeddings()
        with torch.no_grad():
            ids = _prompt_init_ids(model, config).to(embeddings.weight.device)
            adapter.embedding.copy_(embeddings(ids).float())
    return adapter


def build_p_tuning(model: nn.Module, config: PromptEncoderConfig) -> VirtualTokens:
    dim = _embedding_dim(model, config)
    if config.inference_mode:
        return VirtualTokens(config.num_virtual_tokens, dim)
    hidden = config.encoder_hidden_size or dim
    if config.encoder_reparameterization_type == "LSTM":
        def make_encoder():
            return LSTMEncoder(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
    else:
        def make_encoder():
            return MLP([dim, hidden, hidden, dim], F.relu)
    return VirtualTokens(config.num_virtual_tokens, dim, make_encoder)


def build_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> KVPrefix:
    shape = _prefix_shape(model, config)
    layers, heads, head_dim = shape
    width = layers * 2 * heads * head_dim
    if config.prefix_projection and not config.inference_mode:
        token_dim = heads * head_dim
        def make_encoder():
            return MLP([token_dim, config.encoder_hidden_size or token_dim, width], torch.tanh)
        adapter = KVPrefix(shape, config.num_virtual_tokens, width, make_encoder, embedding_width=token_dim)
        if config.init_weights == "zero":
            adapter.encoder.zero_last()
        return adapter
    adapter = KVPrefix(shape, config.num_virtual_tokens, width)
    if config.init_weights == "zero":
        nn.init.zeros_(adapter.embedding)
    return adapter


def _hooks(build) -> HookMethod:
    return HookMethod(build, identity_at_init=False, top_level_keys=_TOP_LEVEL)


# few parameters: PEFT's prompt-learning examples train at 1e-2 to 3e-2, well above LoRA's rates
register("PROMPT_TUNING", PromptTuningConfig, kind="input", input_hooks=_hooks(build_prompt_tuning), lr_scale=30.0,
         default_config=lambda target_modules=None, r=8: PromptTuningConfig(num_virtual_tokens=r))
register("P_TUNING", PromptEncoderConfig, kind="input", input_hooks=_hooks(build_p_tuning), lr_scale=10.0,
         default_config=lambda target_modules=None, r=8: PromptEncoderConfig(num_virtual_tokens=r))
register_variant("p_tuning_lstm", "P_TUNING", lambda target_modules=None, r=8: PromptEncoderConfig(
    num_virtual_tokens=r, encoder_reparameterization_type="LSTM"))
register("PREFIX_TUNING", PrefixTuningConfig, kind="input", input_hooks=_hooks(build_prefix_tuning), lr_scale=10.0,
         default_config=lambda target_modules=None, r=8: PrefixTuningConfig(num_virtual_tokens=r))
register_variant("prefix_tuning_projection", "PREFIX_TUNING", lambda target_modules=None, r=8: PrefixTuningConfig(
    num_virtual_tokens=r, prefix_projection=True))
