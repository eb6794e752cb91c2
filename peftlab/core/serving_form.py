"""The forms the serving engine batches: ``ServingForm``, one adapter on one linear layer (see
``AdapterLayer.serving_form``), ``SublayerForm``, one adapter on the output of a whole sub-layer (attention, MLP;
see ``HookedAdapter.sublayer_forms``), with ``bottleneck_mlp``, the pure function of its maths, and
``PromptAttentionForm``, a gated attention over an adapter's own keys/values inside an attention module (see
``HookedAdapter.attention_prompts``), with ``prompt_keys_values`` and ``gated_prompt_attention``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn


class _Tensors:
    """``to`` and ``nbytes`` over a form dataclass's tensor fields (others are kept as they are)."""

    def to(self, *args: Any, **kwargs: Any):
        moved = {k: (v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return type(self)(**moved)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in vars(self).values() if isinstance(v, torch.Tensor))


@dataclass
class ServingForm(_Tensors):
    """One adapter on one linear layer, in the form the serving engine batches across adapters:

        y = out_scale ⊙ (W0 (in_scale ⊙ x)) + bias_scale ⊙ b0 + up_scale ⊙ (up (mid_scale ⊙ (down x)))

    Every field is optional (None = identity / absent); ``bias_scale`` is ``out_scale`` when
    ``scale_bias`` is set, else 1. LoRA: down = A, up = s B. DoRA: additionally out_scale = m / ||W0 + s B A||
    (folded into ``up`` too). IA3: out_scale (and scale_bias) or in_scale. VeRA: down/up are the frozen shared
    projections (``shared_projection`` says so, so the engine may store them once for many adapters),
    mid_scale = lambda_d, up_scale = lambda_b. A mixture of LoRA experts (MoLoRA): ``router`` (E, in) and
    ``top_k``; down = the E experts' A stacked (E r, in), up = s times their B side by side (out, E r), and each
    token's low-rank activations are weighed per expert by its gates (``mixture_gates``): the engine's routed
    tables (``serve/routed.py``) hold these.
    """

    down: torch.Tensor | None = None  # (r, in)
    up: torch.Tensor | None = None  # (out, r)
    mid_scale: torch.Tensor | None = None  # (r,)
    up_scale: torch.Tensor | None = None  # (out,)
    out_scale: torch.Tensor | None = None  # (out,)
    in_scale: torch.Tensor | None = None  # (in,)
    scale_bias: bool = False
    shared_projection: bool = False
    router: torch.Tensor | None = None  # (E, in)
    top_k: int = 0

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def vera_like(self) -> bool:
        """A low-rank part with shared projections or per-rank / per-output scales (VeRA's shape), not plain down/up."""
        return self.shared_projection or self.mid_scale is not None or self.up_scale is not None

    def apply(self, x: torch.Tensor, weight_oi: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The adapted output for input ``x`` (..., in): the dense reference of the batched kernels."""
        xin = x if self.in_scale is None else x * self.in_scale
        y = nn.functional.linear(xin, weight_oi)
        if self.out_scale is not None:
            y = y * self.out_scale
        if bias is not None:
            y = y + (bias * self.out_scale if self.scale_bias and self.out_scale is not None else bias)
        return y if self.down is None else y + self.lowrank(x)

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank term ``up_scale ⊙ (up (mid_scale ⊙ gated (down x)))`` alone (``down`` set)."""
        z = nn.functional.linear(x, self.down)
        if self.router is not None:
            experts = self.router.shape[0]
            gates = mixture_gates(nn.functional.linear(x, self.router).float(), self.top_k)
            z = (z.unflatten(-1, (experts, -1)) * gates.unsqueeze(-1).to(z.dtype)).flatten(-2)
        if self.mid_scale is not None:
            z = z * self.mid_scale
        low = nn.functional.linear(z, self.up)
        return low if self.up_scale is None else low * self.up_scale


def topk_gates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, chosen): gates (..., E) the softmax over each token's ``top_k`` largest logits, zero elsewhere;
    chosen (..., k) the experts' indices."""
    values, chosen = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, chosen, torch.softmax(values, dim=-1)), chosen


def mixture_gates(logits: torch.Tensor, top_k: int | torch.Tensor, experts: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Gates (..., E) of a mixture of experts from router ``logits`` (..., E): the softmax over each token's
    ``top_k`` largest logits, zero elsewhere. ``top_k`` may be a tensor broadcasting against ``logits[..., 0]``
    (one k per token: the serving engine's fixed-shape step; k = 0: all gates zero, a row without a mixture),
    ``experts`` likewise the count of real experts (the rest, padding, never chosen). Ties keep ``torch.topk``'s /
    a stable sort's choice."""
    width = logits.shape[-1]
    if experts is not None:
        logits = logits.masked_fill(torch.arange(width, device=logits.device) >= experts.clamp_min(1).unsqueeze(-1),
                                    -torch.inf)
    if not isinstance(top_k, torch.Tensor):
        return topk_gates(logits, top_k)[0]
    values, chosen = logits.sort(dim=-1, descending=True, stable=True)
    values = values.masked_fill(torch.arange(width, device=logits.device) >= top_k.clamp_min(1).unsqueeze(-1),
                                -torch.inf)  # at least one value per row: no softmax over nothing (NaN)
    gates = torch.softmax(values, dim=-1) * (top_k > 0).unsqueeze(-1)
    return torch.zeros_like(logits).scatter(-1, chosen, gates)


def bottleneck_mlp(source: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor,
                   up_bias: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``up phi(down source + down_bias) + up_bias`` per token. Factors shared by every token (down (R, H), down_bias
    (R,), up (H, R), up_bias (H,); ``source`` (..., H)), or one set per token, each with the tokens' leading dim
    (down (T, R, H), down_bias (T, R), up (T, H, R), up_bias (T, H); ``source`` (T, H)): the serving engine's
    fixed-shape step, which gathers every token's row of its slot tables."""
    if down.dim() == 2:
        return nn.functional.linear(activation(nn.functional.linear(source, down, down_bias)), up, up_bias)
    z = torch.baddbmm(down_bias.unsqueeze(-1), down, source.unsqueeze(-1)).squeeze(-1)
    return torch.baddbmm(up_bias.unsqueeze(-1), up, activation(z).unsqueeze(-1)).squeeze(-1)


@lru_cache(maxsize=None)
def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation ``name`` (``ACT2FN``), one instance per name."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"non_linearity {name!r} unknown; use one of transformers' ACT2FN names such as 'relu', "
                         "'gelu', 'silu', 'tanh'")
    return ACT2FN[name]


@dataclass
class SublayerForm(_Tensors):
    """One adapter on one whole sub-layer ``y = f(x)`` (a decoder layer's attention after o_proj, or its MLP), in the
    form the serving engine batches across adapters (a bottleneck adapter):

        serial:    y' = [y +] scaling * (up phi(down y + down_bias) + up_bias)      (``residual``: the ``y +``)
        parallel:  y' =  y  + scaling * (up phi(down x + down_bias) + up_bias)

    ``y'`` replaces the sub-layer's output before the block adds its residual stream."""

    down: torch.Tensor  # (R, H)
    down_bias: torch.Tensor  # (R,)
    up: torch.Tensor  # (H, R)
    up_bias: torch.Tensor  # (H,)
    scaling: float = 1.0
    non_linearity: str = "relu"
    parallel: bool = False
    residual: bool = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adapted output for sub-layer input ``x`` and output ``y`` (..., H): the reference of the batched
        tables (``peftlab.serve.sublayer``)."""
        update = self.scaling * bottleneck_mlp(x if self.parallel else y, self.down, self.down_bias, self.up,
                                               self.up_bias, activation_fn(self.non_linearity))
        return y + update if self.residual else update


def prompt_keys_values(prompt: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module,
                       head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values (..., n, kv_heads, head_dim) an attention module's ``k_proj`` / ``v_proj`` make of a
    prompt (..., n, hidden), without rotary embedding."""
    return k_proj(prompt).unflatten(-1, (-1, head_dim)), v_proj(prompt).unflatten(-1, (-1, head_dim))


def gated_prompt_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gate: torch.Tensor,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """``gate * softmax(query keys^T / sqrt(D)) values`` over the last two dims: query (..., L, D), keys / values
    (..., n, D) (no causal mask: every query sees the whole prompt), ``gate`` broadcastable to (..., L, n); the
    softmax in fp32, the rest in the query's dtype. ``valid`` (bool, broadcastable to (..., L, n)): the positions
    each query sees; the others score ``finfo.min``, so a row that sees none is uniform (finite), never NaN."""
    scores = query @ keys.transpose(-2, -1) / math.sqrt(query.shape[-1])
    if valid is not None:
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    probs = gate.to(query.dtype) * nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return probs @ values


@dataclass
class PromptAttentionForm(_Tensors):
    """One adapter inside one attention module (LLaMA-Adapter), in the form the serving engine batches across
    adapters: a second attention of the layer's rotary queries q (heads, D) over the adapter's own keys and values,
    gated, added to the attention's output before its output projection W_o:

        o' = o + gate * softmax(q K^T / sqrt(D)) V      per query head; K, V of its KV head (grouped-query attention)

    K, V: ``prompt_keys_values`` of the adapter's prompt through the layer's own (base) k_proj / v_proj, no rotary.
    W_o o' = W_o o + W_o (gate ...): the adapter's term through W_o, the projection's bias once."""

    keys: torch.Tensor  # (n, kv_heads, D)
    values: torch.Tensor  # (n, kv_heads, D)
    gate: torch.Tensor  # (1,)

    @property
    def length(self) -> int:
        return int(self.keys.shape[0])

    def apply(self, query: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted attention output for rotary queries ``query`` and attention output ``out`` (T, heads, D):
        the reference of the batched tables (``peftlab.serve.prompt_attention``)."""
        return out + grouped_prompt_attention(query, self.keys, self.values, self.gate)


def grouped_prompt_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gate: torch.Tensor,
                             valid: torch.Tensor | None = None) -> torch.Tensor:
    """``gated_prompt_attention`` of queries (T, heads, D) over keys / values (n, kv_heads, D) shared by every token,
    or one set per token (T, n, kv_heads, D) with ``gate`` (T, 1) and ``valid`` (T, n): the query heads grouped by
    their KV head (head h reads KV head h // groups, as ``repeat_interleave`` of the KV heads), nothing repeated.
    Returns (T, heads, D)."""
    tokens, heads, dim = query.shape
    kv_heads = keys.shape[-2]
    grouped = query.reshape(tokens, kv_heads, heads // kv_heads, dim)  # (T, kv_heads, groups, D)
    if valid is not None:
        valid = valid[:, None, None, :]
    mixed = gated_prompt_attention(grouped, keys.transpose(-3, -2), values.transpose(-3, -2),
                                   gate.reshape(-1, 1, 1, 1), valid)
    return mixed.reshape(tokens, heads, dim)
