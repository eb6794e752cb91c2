"""Causal attention over a KV prefix without a mask: the ``peftlab_sdpa`` attention implementation.

When the cache holds keys before the queries (prefix tuning's and Cartridges' virtual positions), transformers'
``sdpa`` builds a (batch, 1, queries, keys) boolean mask and SDPA leaves its fast kernels for one that takes a mask.
That mask is the causal pattern aligned to the bottom right (query i sees keys 0 .. keys - queries + i); SDPA's own
``is_causal`` aligns to the top left when the keys outnumber the queries, hence the mask. With the queries
preceded by keys - queries zero rows the two alignments agree, and SDPA's ``is_causal`` computes it
(:func:`bottom_right_attention`).

``peftlab_sdpa`` is ``sdpa`` but for that case: its mask function returns no mask where the pattern is exactly
bottom-right causal (no padding, no window, no packed sequences, the keys the cache's past plus the queries), or
is that for every real token (padding at the rows' ends only), and its attention function then runs
:func:`bottom_right_attention`. Everything else goes to ``sdpa``'s own functions, with
the mask ``sdpa`` would build. :func:`install` switches a model on ``sdpa`` to it (the KV-prefix adapters do,
while attached) and returns a handle whose ``remove()`` switches back once no adapter needs it.
"""
from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

NAME = "peftlab_sdpa"
_HALF = (torch.float16, torch.bfloat16)
_lock = threading.Lock()
_FA2 = False  # install(): PEFTLAB_PREFIX_FLASH=fa2 on devices that all run the flash kernel
_USERS = "_peftlab_prefix_attention_users"  # in the model's __dict__: no state_dict, no config.json


def bottom_right_mask(queries: int, keys: int, device=None) -> torch.Tensor:
    """(queries, keys) bool, True where query i may see key j: j <= keys - queries + i."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def _flash_devices() -> bool:
    """Every visible CUDA device runs the flash kernel (sm 8.0 and up)."""
    return torch.cuda.is_available() and all(
        torch.cuda.get_device_capability(i)[0] >= 8 for i in range(torch.cuda.device_count()))


def _fa2_takes(query: torch.Tensor, key: torch.Tensor) -> bool:
    head_dim = query.shape[-1]
    return (_FA2 and query.is_cuda and query.dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256
            and query.shape[1] % key.shape[1] == 0)


def bottom_right_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                           dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, query i seeing keys 0 .. keys - queries + i. query (batch, heads, queries, dim), key
    and value (batch, kv_heads, keys, dim) with kv_heads dividing heads (grouped queries); returns query's shape.

    Computed as causal attention with as many queries as keys: keys - queries zero rows go before the queries, so
    query i sits at position keys - queries + i, where the top-left and bottom-right alignments agree, and the
    extra rows' outputs are dropped (their scores cost (keys - queries)² / 2; their zero output gradients add
    nothing to the keys' and values'). SDPA then picks its kernel as for the model's own causal attention
    (cuDNN's on an H100: there the frozen base's attention took 4.6 ms a step, the flash kernel's bottom-right
    form 8.2 ms over a 16-key prefix, in the thirty-fifth session's profiles), on any device, no mask built.
    ``PEFTLAB_PREFIX_FLASH=fa2`` (read at ``install``): the flash kernel's own bottom-right ``is_causal`` instead
    (CUDA sm 8.0+, half precision), the thirty-fourth session's form, an A/B knob."""
    if _fa2_takes(query, key):
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, False,
                                                                  scale=scale)[0]
    extra = key.shape[-2] - query.shape[-2]
    padded = torch.cat([query.new_zeros(*query.shape[:2], extra, query.shape[-1]), query], dim=2) if extra else query
    out = F.scaled_dot_product_attention(padded, key, value, dropout_p=dropout, is_causal=True, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, extra:]


def _causal_suffices(attention_mask: torch.Tensor | None, keys: int) -> bool:
    """No padding, or padding only at the end of each row (right padding, a training batch's): under causal
    attention no real token sees a later position, so every real token's output is exact without the padding
    mask (the pad positions' own outputs are not ``sdpa``'s, as under flash-attention-2, which drops them; the
    loss masks them). Left padding (generation's) keeps the mask."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != keys or torch.compiler.is_compiling():
        return False
    seen = attention_mask.bool()
    return bool(seen[:, 0].all() and (seen[:, 1:] <= seen[:, :-1]).all())


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
          attention_mask=None, local_size=None, allow_is_causal_skip: bool = True, **kwargs):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    past_first = 1 < q_length < kv_length  # a prefix in the cache: sdpa's "no mask" would mean top-left alignment
    if (past_first and allow_is_causal_skip and mask_function is causal_mask_function and local_size is None
            and isinstance(q_offset, int) and kv_offset == 0 and q_offset + q_length == kv_length
            and _causal_suffices(attention_mask, kv_length)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip and not past_first, **kwargs)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries, keys = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and 1 < queries < keys:
        if not any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks")):
            out = bottom_right_attention(query, key, value, scaling, dropout)
            return out.transpose(1, 2).contiguous(), None
        attention_mask = bottom_right_mask(queries, keys, query.device)[None, None]  # sdpa's extras need the mask
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@functools.cache
def _register() -> None:
    """Register ``NAME`` with transformers' attention and mask interfaces, once (called under ``_lock``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)


class _Handle:
    def __init__(self, model: nn.Module | None):
        self.model = model

    def remove(self) -> None:
        model, self.model = self.model, None
        if model is None:
            return
        with _lock:
            model.__dict__[_USERS] -= 1
            if model.__dict__[_USERS] == 0 and model.config._attn_implementation == NAME:
                model.config._attn_implementation = "sdpa"


def install(model: nn.Module) -> _Handle:
    """Run ``model``'s attention as ``peftlab_sdpa`` if it runs ``sdpa`` (other implementations stay: eager masks
    anyway, flash-attention-2 already aligns to the bottom right; so does a model with sub-configs, which may each
    name their own; ``PEFTLAB_PREFIX_FLASH=0`` keeps ``sdpa``, an A/B knob; ``fa2``: see
    :func:`bottom_right_attention`). Counted per model: the last handle
    removed switches back."""
    config = getattr(model, "config", None)
    if (config is None or os.environ.get("PEFTLAB_PREFIX_FLASH") == "0" or getattr(config, "sub_configs", None)
            or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME)):
        return _Handle(None)
    global _FA2
    with _lock:
        _register()
        _FA2 = os.environ.get("PEFTLAB_PREFIX_FLASH") == "fa2" and _flash_devices()  # not traced: read here
        model.__dict__[_USERS] = model.__dict__.get(_USERS, 0) + 1
        config._attn_implementation = NAME
    return _Handle(model)
