"""Compiled decoder layers that recompute their pointwise work in backward instead of keeping its results.

An adapter that trains beside a frozen base makes each layer keep what the base alone would not: the input of
every adapted linear, for its low-rank weight gradient. In a Llama layer those are the two RMSNorm outputs (q/k/v
and gate/up read them) and the SwiGLU product ``act(gate) * up`` (down reads it): 2 x 2h + 2f bytes a token in bf16
(1B shape, h 2048, f 8192: 24 KiB a token and layer, ~1.5 GiB at batch 4 x 1024). All three are pointwise results
of tensors the layer keeps anyway (its input, the gate and up projections). ``recompute_pointwise`` wraps each
decoder layer in torch's selective activation checkpoint with a policy that keeps the outputs of matrix products,
attention, sums, random ops and ops on per-module tensors (no token dimension: a norm, a scale vector) and recomputes
everything else; torch.compile traces it into the layer's graph, so the
recompute is fused into the backward kernels (no second forward, no Python per layer at run time). Unsloth gets
the same effect from hand-written backward kernels that rebuild SwiGLU and the norms.

    with recompute_pointwise(model):   # before the first compiled call; the layers must be compiled
        ...

Outside a compiled trace (eager layers, or after a compile failure made the trainer go eager) the wrapper calls the
plain forward: an eager selective checkpoint would run Python for every op and refuses tensors changed in place.
What a layer keeps and its gradients against the plain compiled layer are checked on the CPU
(``tests/test_pointwise.py``; counts at the 1B widths: ``bench/pointwise_cpu.py``). On the H100 (1B shape,
twenty-third session) it lowered the step's peak by 7-21% at 1-7% of its time for LoRA, DoRA, AdaLoRA, Tied-LoRA,
VeRA, LoHa, LoKr, OFT and HRA, which take it by default (``TrainArgs.recompute_pointwise`` "auto", the adapters'
``recomputes_pointwise`` flag); IA3's layers kept more with it and BOFT's step took 12% longer. torch logs a
warning when it traces a selective checkpoint (in-place ops inside it); the fused nodes' in-place products are
functionalized by the trace and the tests find the same gradients.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from peftlab.core.blocks import decoder_blocks

_aten = torch.ops.aten
_KEPT_NAMES = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
               "_efficient_attention_forward")
# sums too: where an adapter's output is added to the base's (the reference path), recomputing the sum would keep
# both matrix products instead of the one sum (measured: 2.7x what the plain compiled layer keeps at 1B widths). The
# price: a residual sum is kept where the partitioner alone would not always keep it (IA3 at 1B widths: 5% more than
# without the flag; recomputing sums instead, at hidden 256, gave IA3 10% less but the reference path 2.5x more)
KEPT_OPS = frozenset(getattr(_aten, name).default for name in _KEPT_NAMES if hasattr(_aten, name)) | {
    _aten.add.Tensor, _aten.sub.Tensor}


def policy(ctx, op, *args, token_dims: frozenset = frozenset(), **kwargs) -> CheckpointPolicy:
    """Keep matrix products, attention, sums, random ops (a recompute would draw again), ops outside aten (custom
    kernels, whose cost is unknown) and, given ``token_dims`` (the block input's sequence and token counts), ops on
    per-module tensors only (``_per_module``); recompute the other aten ops."""
    if op in KEPT_OPS or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.MUST_SAVE
    if getattr(op, "namespace", None) != "aten":
        return CheckpointPolicy.MUST_SAVE
    if token_dims and _per_module(args, kwargs, token_dims):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# An op whose tensor inputs have no token dimension and at most one dimension above SMALL_DIM works on per-module
# tensors (a norm, a scale vector, a cast of a rank-r factor): its result costs no memory per token, and recomputing it
# in backward is a launch for next to no work. DoRA's norm chain is several such ops per module: kept, its step took
# 1.6-2.6 ms less on an H200 (1B shape; twenty-sixth session, bench/README.md). A weight-shaped tensor (two large
# dimensions: a dense update built from factors) stays recomputed at any model width.
SMALL_DIM = 256


def _per_module(args, kwargs, token_dims: frozenset) -> bool:
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors:  # factories (full, arange, empty): nothing to read, recomputing is free
        return False
    return all(sum(d > SMALL_DIM for d in t.shape) <= 1 and not token_dims.intersection(t.shape) for t in tensors)


def _token_dims(args, kwargs) -> frozenset:
    """The block input's sequence length and token count (``hidden_states``: (batch, seq, hidden)), the dimensions
    that mark a tensor as per-token; empty with ``PEFTLAB_POINTWISE_SAVE_SMALL=0`` (the A/B knob: recompute
    per-module ops too, as before the twenty-sixth session)."""
    if os.environ.get("PEFTLAB_POINTWISE_SAVE_SMALL", "1") == "0":
        return frozenset()
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return frozenset()
    return frozenset({int(hidden.shape[-2]), int(hidden.shape[:-1].numel())})


def _selective(block_forward):
    def forward(*args, **kwargs):
        if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
            return block_forward(*args, **kwargs)
        rule = functools.partial(policy, token_dims=_token_dims(args, kwargs))
        return checkpoint(block_forward, *args, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, rule), **kwargs)
    return forward


@contextlib.contextmanager
def recompute_pointwise(model: nn.Module) -> Iterator[nn.Module]:
    """Each decoder block of ``model`` under the pointwise-recompute policy while the block is traced (module doc).
    Restores the blocks' forward afterwards."""
    from peftlab.train.activations import check_forwards_free, compile_friendly

    blocks = list(decoder_blocks(model))
    check_forwards_free(blocks)
    try:
        with compile_friendly():
            for block in blocks:
                block.forward = _selective(block.forward)
            yield model
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
