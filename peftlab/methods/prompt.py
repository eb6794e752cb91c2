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
The config base, model dimensions and tables shared with the other prompt methods are in ``_prompt_common.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import ConfigError, check_dropout
from peftlab.core.registry import register, register_variant
from peftlab.methods._prompt_common import (
    KVPrefix, PromptLearningConfig, VirtualTokens, embedding_dim, fill_from_vocabulary, hooks, positive_int,
    prefix_shape,
)

@dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_inits: ClassVar[tuple[str, ...]] = ("RANDOM", "TEXT", "SAMPLE_VOCAB")

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in self.prompt_inits:
            raise ConfigError(f"prompt_tuning_init must be one of {self.prompt_inits}, got {self.prompt_tuning_init!r}")
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
        positive_int(self.encoder_hidden_size, "encoder_hidden_size", optional=True)
        positive_int(self.encoder_num_layers, "encoder_num_layers")
        check_dropout("encoder_dropout", self.encoder_dropout)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        positive_int(self.encoder_hidden_size, "encoder_hidden_size", optional=True)
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


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
    """P-tuning's LSTM head: a bidirectional LSTM, then Linear-ReLU-Linear. The LSTM (a few virtual tokens) runs
    outside autocast, in its weights' dtype: oneDNN has no bf16 LSTM on CPUs without AVX-512 ("could not create a
    primitive descriptor for the LSTM forward propagation primitive" under CPU bf16 autocast on an AVX2 host)."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.head = MLP([2 * hidden, 2 * hidden, dim], F.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            hidden = self.lstm(x.to(self.lstm.weight_ih_l0.dtype))[0]
        return self.head(hidden)


def build_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> VirtualTokens:
    adapter = VirtualTokens(config.num_virtual_tokens, embedding_dim(model, config))
    if config.prompt_tuning_init != "RANDOM" and not config.inference_mode:  # loading: the checkpoint fills it
        fill_from_vocabulary(adapter.embedding, model, config)
    return adapter


def build_p_tuning(model: nn.Module, config: PromptEncoderConfig) -> VirtualTokens:
    dim = embedding_dim(model, config)
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
    shape = prefix_shape(model, config)
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


def _prefix_rate(config: PrefixTuningConfig) -> float:
    """30x for the KV table trained directly, 10x with the encoder. Default compare, tables from a prefill of the first
    training tokens: 3x 4.0071, 10x 3.7498, 30x 3.6504, 100x 3.8486; with the encoder 10x 3.8472, 30x 8.33 (diverged);
    base model 4.2587 (bench/results/compare/lr_probe/probe_kv_prefill.md)."""
    return 10.0 if config.prefix_projection else 30.0


# few parameters: PEFT's prompt-learning examples train at 1e-2 to 3e-2, well above LoRA's rates. P-tuning is the
# exception: its encoder (an MLP or LSTM over the virtual tokens) diverged at 10x in the default compare (eval loss 5.7-6.4
# against the base model's 4.26), and at 3x the MLP form ended above the base; at LoRA's rate (PEFT's P-tuning example
# trains at 1e-3) both forms end below it
register("PROMPT_TUNING", PromptTuningConfig, kind="input", input_hooks=hooks(build_prompt_tuning), lr_scale=30.0,
         default_config=lambda target_modules=None, r=8: PromptTuningConfig(num_virtual_tokens=r))
register("P_TUNING", PromptEncoderConfig, kind="input", input_hooks=hooks(build_p_tuning), lr_scale=1.0,
         default_config=lambda target_modules=None, r=8: PromptEncoderConfig(num_virtual_tokens=r))
register_variant("p_tuning_lstm", "P_TUNING", lambda target_modules=None, r=8: PromptEncoderConfig(
    num_virtual_tokens=r, encoder_reparameterization_type="LSTM"))
register("PREFIX_TUNING", PrefixTuningConfig, kind="input", lr_scale=_prefix_rate,
         input_hooks=hooks(build_prefix_tuning, kv_prefill=lambda config: not config.prefix_projection),
         default_config=lambda target_modules=None, r=8: PrefixTuningConfig(num_virtual_tokens=r))
register_variant("prefix_tuning_projection", "PREFIX_TUNING", lambda target_modules=None, r=8: PrefixTuningConfig(
    num_virtual_tokens=r, prefix_projection=True))
