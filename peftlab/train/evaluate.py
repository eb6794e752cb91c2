"""Evaluation: token-weighted LM loss and perplexity over a dataset, from the logits alone."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peftlab.core.inject import disabled
from peftlab.train.data import Collator, label_tokens
from peftlab.train.step import autocast_context as _autocast


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token cross-entropy over the label tokens (-100 ignored), from the logits alone: the
    language-model loss without any regulariser a method or library adds to ``outputs.loss`` (PEFT's
    AdaLoRA adds its orthogonality penalty there in eval mode too)."""
    logits = logits[:, -labels.shape[1]:]  # methods that return logits for virtual tokens too
    return float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                 ignore_index=-100, reduction="sum"))


def adapters_off(model: torch.nn.Module):
    """peftlab's ``disabled`` block, or the adapted model's own one (HF PEFT's ``disable_adapter``)."""
    own = getattr(model, "disable_adapter", None)
    return own() if callable(own) else disabled(model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, collate: Collator, batch_size: int, device: torch.device) -> dict | None:
    """Token-weighted mean LM loss and perplexity over ``dataset`` (None when it has no label tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            n = label_tokens(batch["labels"])
            if n == 0:
                continue
            labels = batch.pop("labels").to(device)
            with _autocast(device):
                logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
            total += lm_loss_sum(logits, labels)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        return None
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
