"""Activated LoRA (aLoRA; PEFT's ``LoraConfig(alora_invocation_tokens=[...])``): the LoRA acts only from the
last occurrence of an invocation token sequence on, so everything before it is the base model's, and a
key-value cache built by the base model for that prefix can be reused.

For each row of a model call's ``input_ids`` the gate is

    gate[b, t] = t >= start_b      (start_b: where the last occurrence of the invocation tokens begins)

and rows without the invocation get no adapter at all, as in PEFT. A call that continues a cache (generation's
decoding steps, ``past_key_values`` non-empty) gates all its tokens in the rows where the invocation was found in
the calls before (PEFT computes its offsets once from the prompt and clips them to each step's length), and also
from any invocation inside the new tokens. The gate is computed once per model call by core's pre-forward hook
(``Method.token_gate``, core/hooks.py) and read by each layer; the layer is LoRA's, its update multiplied by the
gate. Not mergeable (the update depends on the tokens), so merge, convert and the servers refuse it, as PEFT
refuses merging.
"""
from __future__ import annotations

import torch

from peftlab.core.adapter import AdapterError, BaseView, tokens_mask
from peftlab.core.config import ConfigError
from peftlab.methods.lora import LoraConfig, LoraLayer


def validate_invocation(config: LoraConfig) -> None:
    tokens = config.alora_invocation_tokens
    if tokens is None:
        return
    if not isinstance(tokens, list) or not tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ConfigError(f"alora_invocation_tokens must be a non-empty list of token ids, got {tokens!r}")
    if config.use_dora or config.lora_bias or getattr(config, "target_parameters", None):
        raise ConfigError("alora_invocation_tokens (activated LoRA) works with plain LoRA on linear layers, not with "
                          "use_dora, lora_bias or target_parameters")


def invocation_starts(ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(B,) index where the last occurrence of ``tokens`` begins in each row of ``ids`` (B, T), -1 where absent."""
    b, t = ids.shape
    n = len(tokens)
    if t < n:
        return torch.full((b,), -1, dtype=torch.long, device=ids.device)
    windows = ids.unfold(1, n, 1)  # (B, T - n + 1, n)
    found = (windows == torch.tensor(tokens, device=ids.device)).all(-1)
    index = torch.arange(t - n + 1, device=ids.device).expand(b, -1)
    return torch.where(found, index, -1).amax(1)


def token_gate(config, input_ids: torch.Tensor | None, lead: tuple[int, int], cached: bool,
               memory: dict) -> torch.Tensor | None:
    """The (B, T) bool gate of one model call for an aLoRA ``config`` (None for other LoRA configs); ``memory``
    (kept per model and adapter) carries which rows found the invocation across a cached generation."""
    tokens = getattr(config, "alora_invocation_tokens", None)
    if not tokens:
        return None
    b, t = lead
    device = input_ids.device if input_ids is not None else None
    if input_ids is None:  # inputs_embeds only: no ids to search, so the base model (PEFT warns and does the same)
        start = torch.full((b,), -1, dtype=torch.long, device=device)
    else:
        start = invocation_starts(input_ids, tokens)
    gate = (torch.arange(t, device=device)[None, :] >= start[:, None]) & (start >= 0)[:, None]
    found = start >= 0
    before = memory.get("found")
    if cached and before is not None and before.shape[0] == b:
        gate = gate | before.to(gate.device)[:, None]
        found = found | before.to(found.device)
    memory["found"] = found
    return gate


class ALoraLayer(LoraLayer):
    """LoRA whose update reaches only the gated tokens of each call."""

    supported_kinds = frozenset({"linear"})
    mergeable = False  # the update depends on where the invocation is
    batched_serving = False
    serves_from_state = False
    compiles_in_layers = False  # the gate changes shape every call: stay eager
    reads_token_gate = True  # ``self.gate``: this call's (B, T) gate, set by core before each model call

    def __init__(self, base: BaseView, config: LoraConfig, module_name: str):
        if base.kind != "linear":
            raise AdapterError(f"alora_invocation_tokens on {module_name!r} ({base.kind}): activated LoRA adapts "
                               "linear layers only (as PEFT)")
        super().__init__(base, config, module_name)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate
        if gate is None:  # called outside a model call that set the gate: the base model, as PEFT without offsets
            return torch.zeros(*x.shape[:-1], self.lora_B.weight.shape[0], dtype=x.dtype, device=x.device)
        rows = tokens_mask(gate, x.shape[:-1])
        if rows is None or gate.shape[1] != x.shape[-2]:
            raise AdapterError(f"activated LoRA on {self.module_name!r}: input of shape {tuple(x.shape)} is not "
                               f"(batch, tokens, features) of this call's {tuple(gate.shape)} tokens")
        return super().delta(x) * rows.view(*x.shape[:-1], 1).to(x.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        return None

    def serving_form(self, base: BaseView):
        return None

    def low_rank_factors(self):
        return None  # not a plain s B A on every token: combine / hot-swap preparation refuse it
