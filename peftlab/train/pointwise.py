"""Compiled decoder layers that recompute their pointwise work in backward instead of keeping its results.

An adapter that trains beside a frozen base makes each layer keep what the base alone would not: the input of
every adapted linear, for its low-rank weight gradient. In a Llama layer those are the two RMSNorm outputs (q/k/v
and gate/up read them) and the SwiGLU product ``act(gate) * up`` (down reads it): 2 x 2h + 2f bytes a token in bf16
(1B shape, h 2048, f 8192: 24 KiB a token and layer, ~1.5 GiB at batch 4 x 1024). All three are pointwise results
of tensors the layer keeps anyway (its input, the gate and up projections). ``recompute_pointwise`` wraps each
decoder layer in torch's selective activation checkpoint with a policy that keeps the outputs of matrix products,
attention, sums, random ops and ops on per-module tensors (no token dimension: a norm, a scale vector) and recomputes
everything else; torch.compile traces it into the layer's graph, so the recompute is fused into the backward kernels
(no second forward, no Python per layer at run time). Unsloth gets the same effect from hand-written backward kernels
that rebuild SwiGLU and the norms.

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
import math
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


def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matrix products, attention, sums, random ops (a recompute would draw again) and ops outside aten
    (custom kernels, whose cost is unknown); recompute the other aten ops."""
    if op in KEPT_OPS or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.MUST_SAVE
    if getattr(op, "namespace", None) != "aten":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# An op that reads no token dimension and whose result is rank-sized (everything but its longest dimension holds at
# most SMALL_REST entries: a vector, a rank-r factor, an r x r Gram matrix) works on per-module tensors: its result
# costs no memory per token, and recomputing it in backward is a launch for next to no work, or worse, work fused into
# a token-sized kernel. DoRA's norm chain is several such ops per module: kept, its step took 1.6-2.6 ms less on an
# H200 and 1.5 ms less on an H100 (1B shape; twenty-sixth / twenty-seventh sessions, bench/README.md). A weight-shaped
# result (a dense update built from factors) stays recomputed, and so do wider factors: VeRA's rank-256 projections and
# LoHa's rank-r^2 (256) products, kept under the first form of the rule (inputs with at most one dimension above 256),
# cost 0.25 and 0.37 GiB more at the same step time (H100, twenty-seventh session).
SMALL_REST = 64
_aten_reductions = {"sum": 1, "mean": 1, "amax": 1, "amin": 1, "linalg_vector_norm": 2}  # op name: its dims argument


def result_shape(op, args: tuple, tensors: list) -> tuple:
    """The shape an op's result will have, from its inputs: a reduction's input less its reduced dimensions, else the
    inputs' broadcast shape (pointwise ops), else the largest input's (the policy runs before the op)."""
    name = getattr(getattr(op, "overloadpacket", None), "__name__", "")
    first = tuple(tensors[0].shape)
    where = _aten_reductions.get(name)
    if where is not None and args and args[0] is tensors[0]:
        dims = args[where] if len(args) > where else None
        keep = len(args) > where + 1 and args[where + 1] is True
        if dims is None or dims == [] or dims == ():
            return tuple(1 for _ in first) if keep else ()
        dims = {d % len(first) for d in ([dims] if isinstance(dims, int) else dims)}
        return tuple(1 if i in dims else d for i, d in enumerate(first) if keep or i not in dims)
    try:
        return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
    except RuntimeError:
        return max((tuple(t.shape) for t in tensors), key=math.prod)


class PerModuleRule:
    """``policy`` that also keeps per-module ops (``per_module``). The token dimensions (sequence length, token count)
    come from the first tensor of three or more dimensions that the region reads, the block's input: read while
    AOTAutograd traces the region, not by dynamo, so the rule adds no guard to the graph (under dynamic shapes those
    sizes are symbolic and every symbolic size counts as a token dimension)."""

    def __init__(self):
        self.token_dims: frozenset | None = None

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        decision = policy(ctx, op, *args, **kwargs)
        if decision is CheckpointPolicy.MUST_SAVE:
            return decision
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.token_dims is None:
            block_input = next((t for t in tensors if t.dim() >= 3), None)
            if block_input is None:
                return decision
            self.token_dims = token_dims_of(block_input)
        return CheckpointPolicy.MUST_SAVE if per_module(tensors, self.token_dims, op, args) else decision


def token_dims_of(hidden: torch.Tensor) -> frozenset:
    """The static ones of (sequence length, token count) of a (batch, seq, hidden) tensor."""
    count = math.prod(hidden.shape[:-1])  # not Size.numel(), which makes a symbolic size concrete (a graph per length)
    return frozenset(d for d in (hidden.shape[-2], count) if type(d) is int)


def per_module(tensors: list, token_dims: frozenset, op=None, args: tuple = ()) -> bool:
    """Whether every tensor read has static dimensions (parameters' are; a symbolic one is a batch or sequence size),
    none of them in ``token_dims``, and the op's result (``result_shape``) is rank-sized (at most SMALL_REST entries
    per position of its longest dimension); False for no tensor (factories read nothing). The result's shape is
    worked out only for static inputs, so no symbolic size is ever compared (no guard)."""
    if not tensors:
        return False
    for t in tensors:
        dims = tuple(t.shape)
        if not all(type(d) is int for d in dims) or token_dims.intersection(dims):
            return False
    result = result_shape(op, args, tensors)
    return math.prod(result) <= max(result, default=1) * SMALL_REST


def _contexts():
    """The region's checkpoint contexts, a fresh rule each (``PEFTLAB_POINTWISE_SAVE_SMALL=0``: the plain policy,
    per-module ops recomputed too, as before the twenty-sixth session; an A/B knob read when a region is traced)."""
    if os.environ.get("PEFTLAB_POINTWISE_SAVE_SMALL", "1") == "0":
        return create_selective_checkpoint_contexts(policy)
    return create_selective_checkpoint_contexts(PerModuleRule())


def _selective(block_forward):
    def forward(*args, **kwargs):
        if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
            return block_forward(*args, **kwargs)
        return checkpoint(block_forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
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
