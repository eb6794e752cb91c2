"""A lean block checkpoint: one autograd node per block that recomputes the block inside its own backward.

    forward:   out = block(h, ...) under no_grad; keep h (or its offloaded copy), the RNG and autocast state
    backward:  out = block(h, ...) again with grad, replaying them; backward through it; return dL/dh

This is the "reentrant" checkpoint (Unsloth's too): no saved-tensor hooks around every tensor the block saves, no
graph of holders, no early-stop bookkeeping. torch's non-reentrant ``checkpoint`` does all of that in Python per
block and step; the compiled, checkpointed steps are host-bound (1B offloaded on the H200: ~80 ms of kernels in a
103-121 ms step, bench/README.md), and on the CPU proxy (bench/train_overhead.py, 16 compiled layers) the step went
from 40.6 to 26.5-28.4 ms with this node against torch's (eleventh session; not yet measured on a GPU).

It is used (``eligible``) only where it gives the same gradients as the non-reentrant one:
* not while torch.compile traces (the traced placement keeps torch's checkpoint, which the compiler understands);
* no KV cache among the arguments (prefix tuning writes its prefix there; ``_replaying`` handles it with torch's);
* no argument but the hidden state requires grad (their gradients would be lost);
* no adapter computes a loss in its forward (capability ``loss_in_forward``, MoLoRA's balancing loss: run under
  no_grad here, its gradient would be lost);
* no adapter reads a grad-requiring tensor computed outside the block in the same call (capability
  ``reads_outer_graph``, X-LoRA's scalings: each block's backward here would run into that tensor's graph again);
* one process: DistributedDataParallel's reducer expects each gradient once per backward pass.
* ``PEFTLAB_CKPT_REENTRANT=0`` turns it off (torch's non-reentrant checkpoint everywhere).
Like torch's reentrant checkpoint, gradients reach parameters by ``.grad`` accumulation inside the block's
backward, so ``torch.autograd.grad(loss, params)`` would not see them; ``loss.backward()`` (our trainer, HF
Trainer) does. Every block goes through the node, also one without trainable parameters of its own: it may use
others' (hook-based adapters keep theirs on the model, Tied-LoRA shares its matrices across layers).

Under CUDA graphs (a block compiled with mode "reduce-overhead": inductor's cudagraph trees) the node keeps every
tensor it hands on out of the graphs' memory pool (``Graphed``): each call of a block (forward, recompute) begins a
new graph generation, so the trees replay one recorded graph per block and kind at their root instead of growing a
path that the recompute's second call of the same block breaks ("accessing tensor output of CUDAGraphs that has
been overwritten", 8B QLoRA on the H200, tenth session); the forward's outputs, the hidden state's gradient and
every parameter gradient the backward creates are cloned before the next call replays over them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten


def enabled_for(model: nn.Module) -> bool:
    """Whether ``model``'s checkpointed blocks may take the lean node (the checks that hold for the whole run)."""
    if os.environ.get("PEFTLAB_CKPT_REENTRANT", "1") == "0":
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    from peftlab.train.packing import attached_adapters  # packing imports activations, which imports this

    return not any(a.loss_in_forward or a.reads_outer_graph for a in attached_adapters(model))


def eligible(args: tuple, kwargs: dict, is_cache: Callable[[Any], bool]) -> bool:
    """The per-call checks: the hidden state first, no cache, no other argument that requires grad."""
    if not args or not isinstance(args[0], torch.Tensor) or torch.compiler.is_compiling():
        return False
    if any(is_cache(value) for value in (*args[1:], *kwargs.values())):
        return False
    # tensors also inside tuples (position_embeddings is (cos, sin)) and whatever pytree flattens
    return not any(isinstance(v, torch.Tensor) and v.requires_grad for v in tree_flatten((args[1:], kwargs))[0])


_ANCHOR: dict[torch.device, torch.Tensor] = {}
_TENSOR = object()  # marks the output leaves the node returns


def _anchor(device: torch.device) -> torch.Tensor:
    """A leaf that requires grad, so the node joins the graph even when the hidden state needs no gradient (the
    first block over a frozen embedding) and the block's parameters do."""
    if device not in _ANCHOR:
        _ANCHOR[device] = torch.empty(0, device=device, requires_grad=True)
    return _ANCHOR[device]


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, hidden, call):
        ctx.call, ctx.store, graphed = call, call.store, call.graphed
        ctx.stored = ctx.store.pack(hidden) if ctx.store is not None else None
        if ctx.store is None:
            ctx.save_for_backward(hidden)
        ctx.hidden_grad = hidden.requires_grad
        ctx.rng = _rng_state(hidden.device)
        ctx.autocast = _autocast_state(hidden.device)
        with torch.no_grad():
            out = call.run(hidden)
        if graphed is not None:
            out = tree_map_only(torch.Tensor, torch.clone, out)
        leaves, call.spec = tree_flatten(out)
        call.others = [_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves]
        tensors = tuple(v for v in leaves if isinstance(v, torch.Tensor))
        ctx.mark_non_differentiable(*(t for t in tensors if not t.is_floating_point()))
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.store.unpack(ctx.stored) if ctx.store is not None else ctx.saved_tensors[0]
        hidden = hidden.detach().requires_grad_(ctx.hidden_grad)
        joint = ctx.call.joint
        if joint is not None and joint.usable():  # no randomness in such blocks: no RNG state to replay
            try:
                with _autocast(ctx.autocast):
                    return None, joint.backward(ctx.call, hidden, grads), None
            except torch._dynamo.exc.TorchDynamoException as exc:  # it did not compile: the plain node from here on
                joint.give_up(exc)
        with torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []), torch.enable_grad():
            _set_rng_state(hidden.device, ctx.rng)
            with _autocast(ctx.autocast):
                out = ctx.call.run(hidden)
        leaves = [v for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor)]
        pairs = [(o, g) for o, g in zip(leaves, grads) if g is not None and o.requires_grad]
        graphed = ctx.call.graphed
        fresh = graphed.gradless() if graphed is not None else ()
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grad = hidden.grad if ctx.hidden_grad else None
        if graphed is not None:
            graphed.own(fresh)
            grad = grad.clone() if grad is not None else None
        return None, grad, None


class Graphed:
    """What a node needs when its block's compiled call runs as CUDA graphs: the trainable parameters the block's
    backward may give a first gradient to (its own, and those of hook-based or shared adapters)."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params

    def gradless(self) -> list[nn.Parameter]:
        return [p for p in self.params if p.grad is None]

    @staticmethod
    def own(params: list[nn.Parameter]) -> None:
        """A gradient the backward just created is the graph's output tensor itself (autograd takes it over
        rather than copying it); the next replay would overwrite it, so keep a copy (later ones add into it)."""
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.clone()


class Joint:
    """A compiled block's recompute and backward as one compiled function (by default where it applies since the
    nineteenth session; ``PEFTLAB_CKPT_JOINT=0`` turns it off): the forward and ``torch.autograd.grad`` traced together
    (dynamo's ``trace_autograd_ops``), so the compiler drops what the backward does not read. The block's output is such
    a thing: in a Llama block its last linear's product (down_proj: 27% of an 8B block's forward matmul work, 14% of a
    1B block's) and the residual sum are computed in the recompute only to be thrown away. Gradients go to ``params``
    (the block's trainable parameters and those of hook-based or shared adapters) by accumulation into ``.grad``, as the
    plain node's do. Only for blocks without randomness (dropout or an adapter's sample would draw in a differently
    compiled graph)."""

    def __init__(self, params: list[nn.Parameter], backend: str, required: bool = False):
        self.params, self.fn, self.backend, self.required = params, _joint_compiled(backend), backend, required

    def usable(self) -> bool:
        return self.backend not in _JOINT_FAILED

    def give_up(self, exc: Exception) -> None:
        """The joint call failed to compile: where it was not required (``PEFTLAB_CKPT_JOINT=1``), every block on
        this backend takes the plain node from now on (this call included), with one warning; else the error."""
        if self.required:
            raise exc
        _JOINT_FAILED[self.backend] = f"{type(exc).__name__}: {str(exc)[:300]}"
        warnings.warn(f"the joint recompute did not compile on backend {self.backend!r} "
                      f"({_JOINT_FAILED[self.backend]}); checkpointed blocks recompute with the plain node from here "
                      "on (PEFTLAB_CKPT_JOINT=0 skips the attempt)", RuntimeWarning, stacklevel=2)

    def backward(self, call: "_Call", hidden: torch.Tensor, grads: tuple) -> torch.Tensor | None:
        if all(g is None for g in grads):
            return None
        inputs = ([hidden] if hidden.requires_grad else []) + self.params
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            results = self.fn(call.block_forward, hidden, call.rest, call.kwargs, list(grads), inputs)
        for p, g in zip(self.params, results[len(inputs) - len(self.params):]):
            if g is not None:
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        return results[0] if hidden.requires_grad else None


def _joint_backward(block_forward, hidden, rest, kwargs, grads, inputs):
    with torch.enable_grad():
        out = block_forward(hidden, *rest, **kwargs)
    leaves = [v for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor)]
    pairs = [(o, g) for o, g in zip(leaves, grads) if g is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


_JOINT_FAILED: dict[str, str] = {}  # backends on which the joint call failed to compile, and why


@functools.lru_cache(maxsize=None)
def _joint_compiled(backend: str):
    from peftlab.ops.mm_add import inductor_options

    return torch.compile(_joint_backward, backend=backend,
                         **({"options": inductor_options(None)} if backend == "inductor" else {}))


class _Call:
    """The block call a node recomputes (the hidden state is its only tensor input that needs a gradient)."""

    def __init__(self, block_forward, args: tuple, kwargs: dict, store, special: Graphed | Joint | None = None):
        self.block_forward, self.rest, self.kwargs, self.store = block_forward, args[1:], kwargs, store
        self.graphed = special if isinstance(special, Graphed) else None
        self.joint = special if isinstance(special, Joint) else None
        self.spec, self.others = None, None

    def run(self, hidden: torch.Tensor):
        global _depth
        _depth += 1
        try:
            if self.graphed is not None:
                torch.compiler.cudagraph_mark_step_begin()
            return self.block_forward(hidden, *self.rest, **self.kwargs)
        finally:
            _depth -= 1


_depth = 0  # > 0 while a node runs its block: a checkpoint inside it (the forward of a compiled block that
# dynamo runs eagerly) would checkpoint the same block twice


def running() -> bool:
    """Whether a lean node is running its block (forward or recompute) right now."""
    return _depth > 0


def recompute(block_forward, args: tuple, kwargs: dict, store=None, special: Graphed | Joint | None = None):
    """``block_forward(*args, **kwargs)`` through one lean checkpoint node (``store``: offload hooks' pack/unpack;
    ``special``: the block's compiled call runs as CUDA graphs, or its recompute and backward as one compiled call)."""
    hidden = args[0]
    call = _Call(block_forward, args, kwargs, store, special)
    tensors = iter(_Recompute.apply(_anchor(hidden.device), hidden, call))
    return tree_unflatten([next(tensors) if v is _TENSOR else v for v in call.others], call.spec)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast_state(device: torch.device) -> list[tuple]:
    kinds = {device.type, "cpu"}
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in sorted(kinds)]


def _autocast(state: list[tuple]) -> contextlib.ExitStack:
    """The forward's autocast state (device and CPU) around the recompute."""
    stack = contextlib.ExitStack()
    for kind, on, dtype in state:
        stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=on))
    return stack
