"""Activation checkpointing per decoder block, optionally with the block inputs offloaded to host memory.

    with checkpointing(model, "on"):       # or "offload"; "off" does nothing
        loss = model(**batch).loss; loss.backward()

Each block runs under ``torch.utils.checkpoint`` (non-reentrant): its activations are dropped and
re-computed in backward from its inputs. Non-reentrant checkpointing keeps the graph whole, so
gradients reach parameters, inputs and anything a block reads from outside (a prefix in the KV cache,
an adapter's side loss such as MoLoRA's load balancing) exactly as without checkpointing; RNG state
(adapter dropout) and autocast are replayed by torch. Where none of that is at stake (most runs: see
``recompute.py`` for the conditions) a block takes a leaner node with the same gradients and far less Python
per step, which matters because the checkpointed steps are host-bound.

With ``"offload"`` the tensors checkpointing saves per block (its positional inputs: the (batch, time,
hidden) state; keyword inputs such as masks and rotary tables are held, small, on the device) are moved
to pinned host memory by saved-tensor hooks: the copy runs on a side CUDA stream, overlapped with the
next blocks' compute. In backward, fetching a block's input starts the copy back of the previous
block's on the side stream, overlapped with this block's recompute and backward. Tensors under
``min_offload_bytes`` stay on the device.

Blocks compiled by ``torch.compile`` (``compile_model``) are checkpointed in one of two places
(``PEFTLAB_CKPT_COMPILED``): ``around`` (the default) runs the checkpoint around the compiled call, so forward
and recompute are both the compiled forward and whatever the compiled graph saves is dropped and recomputed,
as in eager; ``traced`` puts the checkpoint inside the block's forward, where torch.compile traces it into the
block's graph and its partitioner decides what to recompute (the offload hooks then wrap the compiled call from
outside, where they see what the compiled block saves: its inputs). ``traced`` depends on the compiler's
handling of checkpoints: on the H200's torch 2.11 the traced 8B QLoRA B1 step peaked at 21.6 GiB against 6.3
eager (bench/README.md, ninth session), while torch 2.13 on the CPU saves no more than eager. A compiled block with
forward hooks (FSDP2's) is always traced: around, its hooks would sit inside the checkpoint.

Why our own and not transformers' ``gradient_checkpointing_enable``: that drops the KV cache inside
checkpointed blocks, so prefix tuning (which writes its prefix into the cache) cannot train with it.
Here the cache is an ordinary argument: the state of its layers is recorded before a block runs and
put back for the re-run (and restored after it), so the recompute sees what the forward saw. No
``enable_input_require_grads`` is needed either (non-reentrant checkpointing does not need a
grad-requiring input).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftlab.core.blocks import decoder_blocks
from peftlab.core.config import ConfigError
from peftlab.train import recompute

MODES = ("off", "on", "offload")


class CheckpointError(ValueError):
    """Checkpointing cannot be set up for this model (names the reason)."""


def _is_cache(value: Any) -> bool:
    return hasattr(value, "layers") and hasattr(value, "get_seq_length")


def _cache_state(cache) -> list[dict]:
    return [dict(layer.__dict__) for layer in cache.layers]


def _set_cache_state(cache, state: list[dict]) -> None:
    del cache.layers[len(state):]  # a layer created lazily by the run being undone
    for layer, saved in zip(cache.layers, state):
        layer.__dict__.clear()
        layer.__dict__.update(saved)


class _Stored:
    """One offloaded tensor: its pinned host copy, and a device copy once fetched back ahead of time."""

    def __init__(self, device: torch.device, host: torch.Tensor, copied: Any, index: int):
        self.device, self.host, self.copied, self.index = device, host, copied, index
        self.early: torch.Tensor | None = None
        self.early_ready: Any = None

    def prefetch(self, stream: torch.cuda.Stream) -> None:
        """Start the copy back on the side stream (backward will need it next)."""
        if self.early is not None or self.host is None or self.copied is None:
            return
        with torch.cuda.stream(stream):
            stream.wait_event(self.copied)
            self.early = self.host.to(self.device, non_blocking=True)
            self.early_ready = torch.cuda.Event()
            self.early_ready.record(stream)

    def fetch(self) -> torch.Tensor:
        if self.copied is None:  # CPU model
            return self.host
        if self.early is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.early_ready)
            tensor, self.early = self.early, None
            tensor.record_stream(current)  # made on the side stream, used and freed on this one
        else:
            self.copied.synchronize()
            tensor = self.host.to(self.device, non_blocking=True)
        return tensor


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without one storage
        return None


class _Offload:
    """Saved-tensor hooks that keep tensors in pinned host memory. Forward: copied out on a side stream,
    overlapped with the next blocks. Backward: fetching block k's tensors starts the copy back of block
    k-1's on the side stream, so it overlaps block k's recompute and backward."""

    def __init__(self, stream: torch.cuda.Stream | None, min_bytes: int, keep: set[int] = frozenset()):
        self.stream, self.min_bytes = stream, min_bytes
        self.keep = keep  # storages left where they are: the model's parameters and buffers (a compiled block
        # saves its weights for backward too, and those the hooks around it see)
        self.order: list[_Stored] = []  # this forward's stored tensors, in forward order
        self.backward_started = False

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.numel() * tensor.element_size() < self.min_bytes or _storage(tensor) in self.keep:
            return tensor
        if self.backward_started:  # a new forward (next step or micro-batch): a new order
            self.order, self.backward_started = [], False
        if self.stream is None or tensor.device.type != "cuda":  # CPU model: nothing to gain, same code path
            stored = _Stored(tensor.device, tensor.detach(), None, len(self.order))
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor.detach(), non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            tensor.record_stream(self.stream)  # the allocator must not reuse it before the copy is done
            stored = _Stored(tensor.device, host, copied, len(self.order))
        self.order.append(stored)
        return stored

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self.backward_started = True
        tensor = packed.fetch()
        if self.stream is not None and 0 < packed.index <= len(self.order):
            self.order[packed.index - 1].prefetch(self.stream)  # the block backward meets next
        return tensor


def _checkpointed(block: nn.Module, block_forward, offload: _Offload | None, around_compiled: bool = False,
                  lean: bool = False, special: recompute.Graphed | recompute.Joint | None = None):
    """``block_forward`` under a checkpoint in training. ``around_compiled``: the block's compiled call is
    checkpointed from outside, so a compiled trace of this forward leaves the checkpoint out (a block compiled after
    checkpointing was entered, or inside a compiled parent, traces the checkpoint instead). ``lean``: calls that
    allow it take the one-node checkpoint of ``recompute.py``, the others torch's. ``special``: the compiled call
    runs as CUDA graphs, or recomputes jointly with its backward (``_specials``), which only the lean node does."""
    def forward(*args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return block_forward(*args, **kwargs)
        if around_compiled and (torch.compiler.is_compiling() or recompute.running()):
            return block_forward(*args, **kwargs)  # the checkpoint runs around this compiled call
        if lean and recompute.eligible(args, kwargs, _is_cache):
            return recompute.recompute(block_forward, args, kwargs, offload, special)
        if isinstance(special, recompute.Graphed):
            raise CheckpointError(f"{type(block).__name__} runs as CUDA graphs (compile mode 'reduce-overhead'), "
                                  "which checkpointing supports only through its lean node, and this call cannot "
                                  "take it (a KV cache among its arguments, or another argument that requires "
                                  "grad); compile with mode 'default' or turn checkpointing off")
        cache = next((v for v in kwargs.values() if _is_cache(v)), None)
        run = block_forward if cache is None else _replaying(block_forward, cache)
        # no context manager around it without offload: what torch.compile traces whole in a compiled block
        call = checkpoint if offload is None else _with_hooks(checkpoint, offload)
        return call(run, *args, use_reentrant=False, **kwargs)
    return forward


def _specials(model: nn.Module, blocks: list[nn.Module], lean: bool) -> dict[int, recompute.Graphed | recompute.Joint]:
    """What the lean node does differently for some compiled blocks: those compiled as CUDA graphs get its
    graph-safe form (``recompute.Graphed``); the other compiled ones recompute and backward in one compiled call
    (``recompute.Joint``; ``PEFTLAB_CKPT_JOINT``: unset = wherever it applies, "1" = required, "0" = never). Both need
    the lean node and blocks without randomness (the node replays the RNG state around the recompute; graphs replay
    recorded generator offsets, the joint call draws in a graph of its own), and each gets the trainable parameters
    its backward may reach. Graphs that cannot have these are refused, as is a required joint recompute; where the
    joint recompute was not asked for, such blocks take the plain lean node."""
    from peftlab.train.packing import compiled_backend, graphed

    joint = os.environ.get("PEFTLAB_CKPT_JOINT", "")
    if joint not in ("", "0", "1"):
        raise CheckpointError(f"PEFTLAB_CKPT_JOINT must be 0, 1 or unset, got {joint!r}")
    graphs = [b for b in blocks if graphed(b)]
    joined = [b for b in blocks if joint != "0" and not graphed(b) and compiled_backend(b) is not None]
    for found, what in ((graphs, "blocks compiled as CUDA graphs (compile mode 'reduce-overhead')"),
                        (joined, "the joint recompute (PEFTLAB_CKPT_JOINT=1)")):
        reason = _special_refusal(model, lean, what, found is joined) if found else None  # None: they may
        if reason is not None and (found is graphs or joint == "1"):
            raise CheckpointError(reason)
        if reason is not None:
            found.clear()  # the joint recompute where it applies: here it does not, the plain lean node instead
    if not graphs and not joined:
        return {}
    block_params = {id(p) for b in decoder_blocks(model) for p in b.parameters()}  # kept blocks' too (keep_last)
    outer = [p for p in model.parameters() if p.requires_grad and id(p) not in block_params]
    specials = {}
    for b in graphs + joined:
        params = [p for p in b.parameters() if p.requires_grad] + outer
        specials[id(b)] = recompute.Graphed(params) if graphed(b) else \
            recompute.Joint(params, compiled_backend(b), required=joint == "1")
    return specials


def _special_refusal(model: nn.Module, lean: bool, what: str, traces_grad: bool) -> str | None:
    """Why the blocks cannot take ``what`` (``_specials``; ``traces_grad``: it traces ``torch.autograd.grad``), or
    None."""
    fix = "unset PEFTLAB_CKPT_JOINT (such blocks then take the plain node)" if traces_grad else \
        "compile with mode 'default'"
    if not lean:
        return (f"checkpointing {what} needs the lean checkpoint node, which this model cannot take (several "
                "processes, PEFTLAB_CKPT_REENTRANT=0, or an adapter with a loss in its forward or reading an outside "
                f"graph); {fix}")
    if compiled_placement() != "around":
        return f"checkpointing {what} needs PEFTLAB_CKPT_COMPILED=around"
    from peftlab.train.packing import attached_adapters

    random = [f"{name} (p={m.p})" for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    random += sorted({f"{type(a).__name__} (samples)" for a in attached_adapters(model) if a.draws_random})
    if getattr(getattr(model, "config", None), "attention_dropout", 0.0):
        random.append(f"config.attention_dropout={model.config.attention_dropout}")
    if random:
        return (f"checkpointing {what} needs blocks without dropout or sampling, found {', '.join(random[:3])}"
                f"{' ...' if len(random) > 3 else ''}; set dropout to 0 or {fix}")
    if traces_grad and not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return f"checkpointing {what} needs torch._dynamo.config.trace_autograd_ops (torch {torch.__version__})"
    return None


def _replaying(block_forward, cache):
    """``block_forward`` for a checkpoint whose re-run must see the KV cache as the first run saw it (the counter is
    a side effect, so only blocks with a cache have it)."""
    before = _cache_state(cache)
    calls = [0]

    def run(*a, **kw):
        calls[0] += 1
        if calls[0] == 1:
            return block_forward(*a, **kw)
        after = _cache_state(cache)  # a re-run: give it the cache as the forward saw it
        _set_cache_state(cache, before)
        try:
            return block_forward(*a, **kw)
        finally:
            _set_cache_state(cache, after)
    return run


PLACEMENTS = ("around", "traced")


def compiled_placement() -> str:
    """Where a compiled block's checkpoint goes: ``PEFTLAB_CKPT_COMPILED`` (around | traced), default around."""
    value = os.environ.get("PEFTLAB_CKPT_COMPILED", "") or "around"
    if value not in PLACEMENTS:
        raise CheckpointError(f"PEFTLAB_CKPT_COMPILED must be one of {PLACEMENTS}, got {value!r}")
    return value


def has_module_hooks(block: nn.Module) -> bool:
    """Whether the block has forward (pre-)hooks (FSDP2's all-gather and reshard, for one). A checkpoint around the
    compiled call would put them inside the checkpoint and its recompute, where FSDP2's are not meant to run (it
    shards blocks whose checkpoint sits inside their forward), so such a block's checkpoint is traced instead."""
    return bool(block._forward_hooks or block._forward_pre_hooks)


def checkpoints_around(model: nn.Module) -> bool:
    """Whether compiled blocks of ``model`` would be checkpointed around their compiled call (see the module doc)."""
    return compiled_placement() == "around" and not any(has_module_hooks(b) for b in decoder_blocks(model))


def _with_hooks(call, offload: _Offload):
    def hooked(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
            return call(*args, **kwargs)
    return hooked


def compile_friendly():
    """torch.compile traces a block's checkpoint into the block's graph only if the forward has no side effect it
    would have to replay in the recompute; transformers' hub-kernel layers set a context variable (a side effect
    that needs no replay), which made the whole checkpoint fall back to eager with a graph break, so the compiled
    checkpointed step was no faster than the eager one (ad hoc CPU runs); with it, bench/train_overhead.py
    --checkpointing on gives 40.6 ms against 110.3 eager (bench/results/train_overhead_ckpt_on_cpu.json). Only the
    traced placement (and a block compiled after checkpointing began) needs it; no effect on eager blocks."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is None or not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()
    return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def check_forwards_free(blocks: list[nn.Module]) -> None:
    """Refuse blocks whose ``forward`` another wrapper already replaced on the instance (checkpointing and the
    pointwise recompute each put theirs there and pop it afterwards)."""
    for block in blocks:
        if "forward" in block.__dict__:
            raise CheckpointError(f"{type(block).__name__}.forward is already replaced on the instance")


@contextlib.contextmanager
def checkpointing(model: nn.Module, mode: str = "on", min_offload_bytes: int = 1 << 20,
                  keep_last: int = 0) -> Iterator[nn.Module]:
    """Checkpoint every decoder block of ``model`` inside the block ("off": nothing; "offload": also
    keep the block inputs in pinned host memory). Restores the blocks' forward afterwards.

    ``keep_last``: the last that many blocks are left alone and keep their activations: their backward needs no
    recompute, for their activations' memory. The last blocks are the ones to keep: backward meets them first and
    frees their activations before the first recompute allocates, so they add to the peak only where the forward's
    end is the peak."""
    if mode not in MODES:
        raise CheckpointError(f"checkpointing must be one of {MODES}, got {mode!r}")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise CheckpointError(f"keep_last (blocks left without checkpoints) must be an integer >= 0, got {keep_last!r}")
    if mode == "off":
        yield model
        return
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise CheckpointError("transformers' gradient checkpointing is already on; use one of the two")
    device = next(model.parameters()).device
    offload = None
    if mode == "offload":
        keep = {_storage(t) for t in [*model.parameters(), *model.buffers()]} - {None}
        offload = _Offload(torch.cuda.Stream(device) if device.type == "cuda" else None, min_offload_bytes, keep)
    try:
        blocks = list(decoder_blocks(model))
    except ConfigError as e:
        raise CheckpointError(f"nothing to checkpoint: {e}") from None
    if keep_last > len(blocks):
        raise CheckpointError(f"keep_last={keep_last} blocks left without checkpoints, but the model has only "
                              f"{len(blocks)} decoder blocks")
    blocks = blocks[:len(blocks) - keep_last]
    check_forwards_free(blocks)
    compiled = {id(b): b._compiled_call_impl for b in blocks if getattr(b, "_compiled_call_impl", None) is not None}
    around = compiled_placement() == "around"
    lean = recompute.enabled_for(model)
    specials = _specials(model, blocks, lean)
    wrappers = {}
    try:
        with compile_friendly():
            for block in blocks:
                inner = compiled.get(id(block))
                if inner is not None and (not around or has_module_hooks(block)):
                    # traced into the block's graph; the offload hooks cannot be, so they wrap the compiled call
                    block.forward = _checkpointed(block, block.forward, None)
                    if offload is not None:
                        wrappers[id(block)] = block._compiled_call_impl = _with_hooks(inner, offload)
                else:  # eager blocks checkpoint in forward; compiled ones around the compiled call, which recomputes
                    # the compiled forward (after an uncompile, the forward's checkpoint takes over)
                    block.forward = _checkpointed(block, block.forward, offload, around_compiled=inner is not None,
                                                  lean=lean)
                    if inner is not None:
                        wrappers[id(block)] = block._compiled_call_impl = _checkpointed(
                            block, inner, offload, lean=lean, special=specials.get(id(block)))
            yield model
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
            if id(block) in wrappers and block.__dict__.get("_compiled_call_impl") is wrappers[id(block)]:
                block._compiled_call_impl = compiled[id(block)]
