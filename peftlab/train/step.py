"""The gradient part of one optimizer step, shared by single-process and distributed training.

The loss of a step is the mean over all label tokens of the step's micro-batches, on every process
together: each micro-batch's mean loss is weighted by its share of the step's (global) label tokens.
So batch 4 x accum 1 on one process, batch 2 x accum 2, and 2 processes with 2 examples each take the
same step. The ``sync`` object hides how processes take part (``LocalSync``: alone;
``peftlab.train.distributed.Runtime``: DDP or FSDP2 over ``torch.distributed``).
"""
from __future__ import annotations

import contextlib

import torch

from peftlab.train.data import label_tokens


class LocalSync:
    """One process: nothing to share, every micro-batch without tokens can be skipped."""

    world_size = 1
    collective = False
    """True when every process must run every forward (a collective inside it, or a later reduction)."""

    def total(self, value: float) -> float:
        """The sum of ``value`` over all processes."""
        return value

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward; ``last`` is the step's final one."""
        return contextlib.nullcontext()

    def reduce_gradients(self) -> None:
        """Make the adapter gradients the same on every process (called once per optimizer step)."""


LOCAL = LocalSync()


def autocast_context(device: torch.device):
    """bf16 autocast on a GPU that has it; float32 throughout on a CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_gradients(model: torch.nn.Module, batches: list[dict], device: torch.device,
                         sync: LocalSync = LOCAL, loss_fn=None, between=None) -> tuple[float, int]:
    """Backward over this process's micro-batches of one optimizer step; returns (loss, label tokens)
    of the whole step, summed over all processes.

    Gradients come out as those of the mean loss over all the step's label tokens however the
    examples are split between micro-batches and processes. ``sync`` averages gradients over
    processes, so each process scales its loss by the number of processes. ``loss_fn(model, batch)``
    replaces ``model(**batch).loss`` (the fused cross-entropy). ``between()`` runs after every backward but the
    last (``CompiledSteps.own_grads``: gradients out of CUDA graphs' memory before the next micro-batch).
    """
    counts = [label_tokens(b["labels"]) for b in batches]
    step_tokens = int(sync.total(sum(counts)))
    local_loss = torch.zeros((), dtype=torch.float32, device=device)  # read once a step, not once a micro-batch
    for index, (batch, n) in enumerate(zip(batches, counts)):
        if n == 0 and not sync.collective:
            continue  # nothing to learn (the prompt filled max_length); its weight would be 0
        with sync.accumulating(last=index == len(batches) - 1):
            with autocast_context(device):
                inputs = {k: v.to(device) for k, v in batch.items()}
                if loss_fn is not None and n > 0:
                    raw = loss_fn(model, inputs)
                else:
                    output = model(**inputs, use_cache=False)
                    raw = output.loss
            if n == 0:  # every process must take part: a zero loss that still reaches every adapter
                loss = output.logits.float().sum() * 0.0
            else:
                loss = raw.float() * (n * sync.world_size / step_tokens)
            loss.backward()
        if between is not None and index < len(batches) - 1:
            between()
        local_loss += loss.detach() / sync.world_size
    sync.reduce_gradients()
    return sync.total(local_loss.item()), step_tokens
