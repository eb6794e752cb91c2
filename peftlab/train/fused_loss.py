"""The training loss through the fused linear + cross-entropy (``TrainArgs.fused_ce``, ``--fused-ce``).

The model runs as usual (so input-side adapters' pre-hooks, prefix caches and checkpointing all apply)
but with ``logits_to_keep=1``: the head projects one position only. A forward hook on the inner
decoder captures its last hidden state (already through the final norm), and the loss is
``causal_lm_loss(hidden, lm_head.weight, labels)``, which never holds (tokens, vocab) logits.
Adapters' regularisers (``extra_loss``) are added as the model's loss hook would add them.

Refused with a clear error: an output head with active adapters (its weight is not the map),
models that post-process logits (soft-capping, logit scale), models without ``logits_to_keep``,
input-side adapters with their own labels or loss (CPT).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from peftlab.core.adapter import AdaptedModule, ModulesToSave
from peftlab.core.config import ConfigError
from peftlab.core.hooks import extra_loss
from peftlab.core.input_side import own_loss_adapters
from peftlab.ops.fused_ce import causal_lm_loss

_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def head_tensors(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"fused_ce: {type(model).__name__} has no output embeddings (lm_head)")
    if isinstance(head, ModulesToSave) and type(head).forward is not ModulesToSave.forward and head.active \
            and not head.disabled:
        raise ConfigError("fused_ce: the output head computes some logits its own way (trainable tokens tied to the "
                          "input embedding); train without --fused-ce")
    if isinstance(head, ModulesToSave):
        head = head.modules_to_save[head.active] if head.active and not head.disabled else head.original_module
    if isinstance(head, AdaptedModule):
        live = [n for n in head.active if n not in head.merged]
        if live and not head.disabled:
            raise ConfigError(f"fused_ce: the output head has active adapters {live}; its weight alone is not the "
                              "map (exclude lm_head from target_modules or train without --fused-ce)")
        head = head.base_layer
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"fused_ce: the output head is a {type(head).__name__}, not a Linear")
    return head.weight, head.bias


def check_fused_ce(model: nn.Module) -> None:
    """Raise ConfigError naming the reason when the fused loss cannot reproduce this model's loss."""
    config = getattr(model, "config", None)
    for key in _LOGIT_POSTPROCESSING:
        value = getattr(config, key, None) if config is not None else None
        if value not in (None, 0, 1, 1.0):
            raise ConfigError(f"fused_ce: {type(model).__name__} post-processes logits ({key}={value})")
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"fused_ce: {type(model).__name__}.forward has no logits_to_keep argument")
    own = own_loss_adapters(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    if own:
        raise ConfigError(f"fused_ce: active adapters {own} set their own labels or loss (CPT), which the fused "
                          "loss would skip")
    head_tensors(model)


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if get is not None else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ConfigError(f"fused_ce: cannot find the inner decoder of {type(model).__name__}")
    return decoder


def fused_causal_lm_loss(model: nn.Module, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token loss of ``batch`` (input_ids, attention_mask, labels) without full logits."""
    labels = batch["labels"]
    captured: list[torch.Tensor] = []
    # DDP: call the wrapper (it syncs gradients), read the decoder and the head of the model inside it
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _decoder(inner).register_forward_hook(grab)
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"fused_ce: expected one decoder call per forward, saw {len(captured)}")
    hidden = captured[0]  # prompt-tuning's virtual tokens come first: ignored positions, not a sliced copy
    weight, bias = head_tensors(inner)
    loss = causal_lm_loss(hidden, weight, labels.to(hidden.device), bias=bias, chunk_size=chunk_size,
                          virtual=hidden.shape[1] - labels.shape[1])
    if inner.training:
        extra = extra_loss(inner)
        if extra is not None:
            loss = loss + extra.to(loss.dtype)
    return loss
