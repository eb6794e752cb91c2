"""Sequence packing and compiled adapted layers: two opt-in speed settings of the training loop.

Packing (``TrainArgs.packing``, ``peftlab train --packing``) puts the examples of a micro-batch one after
another in a single row, with no padding:

    input_ids    e_1 ‖ e_2 ‖ ... ‖ e_k                     (1, Σ len e_i)
    position_ids 0..len(e_1)-1 ‖ 0..len(e_2)-1 ‖ ...       restart at every example
    labels       each example's own, its first token -100  (never predicted from the previous example)
    no attention_mask

transformers (>= 5) reads the restarts in ``position_ids`` as sequence boundaries when neither an
attention mask nor a KV cache is given (the loop calls the model with ``use_cache=False``): it builds a block-diagonal causal mask for ``sdpa``, ``eager`` and ``flex_attention``, and
variable-length (cu_seqlens) calls for ``flash_attention_2`` / ``3``; RoPE positions restart too. So no
token attends to another example and the loss is the padded batch's loss over the same label tokens
(tests compare losses and gradients). Other attention implementations are refused. The gain is the
padding no longer computed; with sdpa the explicit mask can keep PyTorch off its flash kernel, so
packing pays off when examples vary in length (measure: ``tokens_per_s`` in metrics.json).

Compiling (``TrainArgs.compile``: a ``torch.compile`` backend, e.g. "inductor") works on one of two scopes
(``TrainArgs.compile_scope``): each decoder layer (``layers``: the attention, norms, MLP and the adapted linears of a
block as one graph, so element-wise ops fuse and the partitioner chooses what backward recomputes; identical blocks
share one compiled graph; and the final norm, which eager kept its fp32 input for backward: 32 MiB at the 1B
shape, in the peak; ``PEFTLAB_COMPILE_FINAL_NORM=0`` leaves it eager), or each adapted module alone (``adapted``:
the fused LoRA / DoRA node and its casts). It is undone when training ends, like every other change train() makes
to a caller's model besides the adapter.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
import weakref
from typing import Iterator

import torch
from torch import nn

from peftlab.core.adapter import AdaptedModule
from peftlab.core.config import ConfigError
from peftlab.ops.mm_add import inductor_options
from peftlab.train.data import IGNORE_INDEX

PACKING_ATTENTION = ("sdpa", "peftlab_sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class PackingCollator:
    """Concatenates a list of examples into one row with restarting ``position_ids`` (see module doc)."""

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for e in examples:
            n = len(e["input_ids"])
            if n == 0:
                continue
            ids += e["input_ids"]
            labels += [IGNORE_INDEX] + list(e["labels"][1:])
            positions += range(n)
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch, packed or padded."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def check_packing(model: nn.Module) -> None:
    """Packing relies on transformers' packed-sequence masks; refuse attention that lacks them."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise ConfigError(f"packing needs one of the attention implementations {PACKING_ATTENTION} "
                          f"(it separates packed examples through position_ids); this model uses {impl!r}")


def adapted_modules(model: nn.Module) -> Iterator[AdaptedModule]:
    return (m for m in model.modules() if isinstance(m, AdaptedModule))


COMPILE_SCOPES = ("layers", "adapted")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that capture each compiled layer in CUDA graphs (inductor's cudagraph trees)."""
GRAPH_PAD = 64
"""Under CUDA graphs padded batches are padded to a multiple of this width: each width records its own graphs."""


def compiled_modules(model: nn.Module, scope: str) -> list[nn.Module]:
    if scope == "layers":
        from peftlab.core.blocks import final_norm
        from peftlab.train.distributed import decoder_layers

        try:
            layers = decoder_layers(model)
        except ConfigError:
            raise ConfigError(f"compile_scope 'layers': found no decoder layers in {type(model).__name__}; use "
                              "compile_scope 'adapted'") from None
        norm = final_norm(model) if os.environ.get("PEFTLAB_COMPILE_FINAL_NORM", "1") != "0" else None
        return layers + ([norm] if norm is not None else [])
    if scope == "adapted":
        return list(adapted_modules(model))
    raise ConfigError(f"compile_scope must be one of {COMPILE_SCOPES}, got {scope!r}")


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, str | None]]" = weakref.WeakKeyDictionary()
"""(backend, mode) of each module ``compile_model`` compiled."""


def compile_model(model: nn.Module, backend: str, scope: str = "adapted", mode: str | None = None) -> None:
    """``torch.compile`` the forward of each module of ``scope`` in place (nn.Module.compile); ``mode`` is
    torch.compile's (e.g. "reduce-overhead": inductor's CUDA graphs)."""
    modules = compiled_modules(model, scope)
    limit = _recompile_limit(len(modules))
    _guard_hooks(modules)
    how = {"options": inductor_options(mode)} if backend == "inductor" else {"mode": mode}
    for module in modules:
        module.compile(backend=backend, **how, **limit)
        _COMPILED[module] = (backend, mode)


def _guard_hooks(modules: list[nn.Module]) -> None:
    """Make dynamo guard on module hooks when any compiled module holds a hooked submodule. By default dynamo skips
    those guards (``skip_nnmodule_hook_guards``), so identical layers share one graph whatever their hooks: a hook
    on only some layers (LLaMA-Adapter's top layers, bottleneck adapters on a subset of layers) was silently left
    out of every layer compiled after one without it (the loss was the base model's, and nothing trained). Only
    ever turned on (stricter guards), for the process; when it is, graphs compiled before (without hook guards, so
    reusable by a hooked layer of the same shape: the base's layers under prompt tuning, say) are dropped. The price:
    each hooked layer compiles its own graph (its hooks are other objects), which ``_recompile_limit`` makes room for;
    identical graphs hit inductor's cache."""
    from peftlab.train.activations import has_module_hooks

    def hooked(module: nn.Module) -> bool:
        return has_module_hooks(module) or bool(module._backward_hooks or module._backward_pre_hooks)
    if torch._dynamo.config.skip_nnmodule_hook_guards and any(
            hooked(sub) for module in modules for sub in module.modules()):
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()


def _recompile_limit(n_modules: int) -> dict:
    """Room for a graph per compiled module, with and without grad: identical layers share one graph, but a layer
    whose compiled code reads per-layer state gets its own (prefix tuning's KV cache: each layer guards on its own
    cache entry). Under dynamo's default limit of 8 graphs per code object, the layers past the 8th ran eager: on
    the 1B shape prefix tuning ran half its layers uncompiled (63 ms a step against prompt tuning's 46). As
    torch.compile's per-call ``recompile_limit`` where this torch has it (the calls share the code object, so it
    counts all modules' graphs), else dynamo's global limit, raised only."""
    import inspect

    limit = 2 * n_modules + 8
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": max(limit, torch._dynamo.config.recompile_limit)}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return {}


def uncompile_model(model: nn.Module, scope: str = "adapted") -> None:
    for module in compiled_modules(model, scope):
        module._compiled_call_impl = None  # what nn.Module.compile set; eager forward again
        _COMPILED.pop(module, None)


def compiled_backend(module: nn.Module) -> str | None:
    """The backend ``compile_model`` compiled ``module`` with, while it is compiled; None otherwise."""
    if getattr(module, "_compiled_call_impl", None) is None:
        return None
    return _COMPILED.get(module, (None, None))[0]


def graphed(module: nn.Module) -> bool:
    """Whether ``module``'s compiled call runs as CUDA graphs (``compile_model`` with a mode of ``GRAPH_MODES``)."""
    return compiled_backend(module) == "inductor" and _COMPILED[module][1] in GRAPH_MODES


def validate_compile_args(args) -> None:
    """The compile settings of ``TrainArgs`` (compile, compile_mode, compile_scope, activation_budget)."""
    if isinstance(args.compile, str) and args.compile != "auto":
        import torch._dynamo

        known_backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in known_backends:
            raise ConfigError(f"compile must be 'auto', None or a torch.compile backend, got {args.compile!r}; "
                              f"backends here: {', '.join(known_backends)}")
    if args.compile_mode not in ("auto", None, *COMPILE_MODES):
        raise ConfigError(f"compile_mode must be 'auto', None or one of {COMPILE_MODES}, got {args.compile_mode!r}")
    if args.activation_budget is not None:
        if not 0 < args.activation_budget <= 1:
            raise ConfigError(f"activation_budget must be in (0, 1], got {args.activation_budget!r}")
        if args.compile is None:
            raise ConfigError("activation_budget acts on compiled layers; it needs compile ('auto' or a backend)")
    if args.recompute_pointwise not in (None, True, False):
        raise ConfigError(f"recompute_pointwise must be None (auto), True or False, got {args.recompute_pointwise!r}")
    if args.recompute_pointwise:
        if args.compile is None:
            raise ConfigError("recompute_pointwise acts on compiled layers; it needs compile ('auto' or a backend)")
        if args.checkpointing != "off" or args.activation_budget is not None:
            raise ConfigError("recompute_pointwise cannot be combined with checkpointing "
                              f"{args.checkpointing!r} / activation_budget {args.activation_budget!r}: each decides "
                              "what the layers keep; pick one")
    if args.compile_scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile_scope must be one of {COMPILE_SCOPES}, got {args.compile_scope!r}")


def resolve_compile(backend: str | None, scope: str, device: torch.device, quantized: bool,
                    compiles: bool = True, memory_first: bool = False,
                    checkpointed: bool = False) -> tuple[str | None, str]:
    """The (backend, scope) a training run compiles with. ``"auto"``: inductor on each decoder layer when training
    on CUDA with Triton present, an unquantized base and adapters that all run in compiled layers (``compiles``;
    the step there is host-bound: compiled layers measured 0.59x PEFT's LoRA step and 0.38x its DoRA step on an
    H200, bench/README.md), eager elsewhere, and eager when the run asked to save memory in a way compiled layers
    would leave to inductor (``memory_first``: lean activations, transformers' own checkpointing; on the H200 the
    lean LoRA step took 7.96 GiB compiled against 6.53 GiB eager; peftlab's checkpointing of blocks with module
    hooks, e.g. FSDP2's, which would be traced). Otherwise peftlab's checkpointing compiles: it runs around each
    compiled block (1B LoRA B4 offloaded: 129-155 ms / 2.98 GiB compiled against 183-204 ms / 3.32 GiB
    eager on the H200). A quantized base compiles under peftlab's checkpointing (``checkpointed``) only: its 8B
    QLoRA B1 step took 232 ms / 6.22 GiB compiled (the layers dequantizing with torch operators,
    peftlab/quant/dequant.py) against 338 ms / 6.27 GiB eager on the H200 (bench/README.md, thirteenth session);
    without checkpointing a compiled 4-bit layer was not measured, and the partitioner may keep the dequantized
    weights for backward (the traced checkpoint did: 8.67 GiB), so it stays eager."""
    if backend != "auto":
        return backend, scope
    if device.type != "cuda" or (quantized and not checkpointed) or not compiles or memory_first:
        return None, scope
    if importlib.util.find_spec("triton") is None:  # inductor's GPU code generator
        return None, scope
    return "inductor", "layers"


def resolve_compile_mode(mode: str | None, backend: str | None, device: torch.device, checkpointed: bool,
                         packed: bool = False, distributed: bool = False, full_parameter: bool = False,
                         padding_sensitive: bool = False, graphs_fail: bool = False) -> str | None:
    """The torch.compile mode a run's compiled layers use (None: torch's default). ``"auto"``: "reduce-overhead"
    (inductor's CUDA graphs per compiled layer) for inductor on CUDA, one process, no peftlab checkpointing, no
    packing, adapters whose results do not depend on padding (not ``padding_sensitive``: graphs pad each batch to
    a multiple of ``GRAPH_PAD``; no registered method is, since MoE-LoRA reads the attention mask) and a small
    trainable share (not ``full_parameter``: the gradients the graphs hold, and copy between micro-batches, see
    ``CompiledSteps``, would be the whole model's) and adapters whose layers have replayed as graphs (not
    ``graphs_fail``: ``replays_as_graphs``); the default elsewhere. The compiled steps are host-bound: on
    the H200 the CUDA graphs took the 1B LoRA step from 62-78 ms to 53-54 ms and DoRA / HRA / BOFT from 74-107 ms
    to 61-63 ms (bench/README.md, tenth session). Checkpointed steps gained nothing from graphs on the H100 (the
    offloaded 1B step 82.8 against 83.2 ms, 0.19 GiB more; seventeenth session), so "auto" leaves them out; asked
    for, they run through the lean node's graph-safe form (recompute.py); a packed row's width
    changes every step, so each step would record new graphs; several processes were not tried."""
    if mode != "auto":
        return None if backend is None or mode in (None, "default") else mode
    if backend == "inductor" and device.type == "cuda" and not (checkpointed or packed or distributed
                                                                 or full_parameter or padding_sensitive
                                                                 or graphs_fail):
        return "reduce-overhead"
    return None


def resolve_pointwise(args, backend: str | None, scope: str, device: torch.device, adapters_gain: bool,
                      distributed: bool = False) -> bool:
    """Whether the compiled layers recompute their pointwise work in backward (``args.recompute_pointwise``,
    train/pointwise.py). None ("auto"): where inductor compiles the decoder layers on CUDA with neither checkpointing
    nor an activation budget deciding what they keep, in one process and without packing (neither was tried), for
    adapters that all gain from it (``adapters_gain``: ``pointwise_gains``). On the H100 (1B shape, bench/README.md,
    twenty-third session) it cut LoRA's peak from 7.29 to 5.94 GiB (0.87x Unsloth's 6.79 in the same call) at 1.02x
    its time; DoRA 0.88x the peak at 1.07x the time."""
    if args.recompute_pointwise is not None:
        return bool(args.recompute_pointwise) and backend is not None
    return backend == "inductor" and scope == "layers" and device.type == "cuda" and args.checkpointing == "off" \
        and args.activation_budget is None and not args.packing and adapters_gain and not distributed


def pointwise_gains(model: nn.Module) -> bool:
    """Whether ``model`` has adapters and all of them gain from the pointwise recompute (``recomputes_pointwise``)."""
    return bool(attached_adapters(model)) and _all_adapters(model, "recomputes_pointwise")


class CompiledSteps:
    """The compile state of one run's training steps: which modules are compiled, and whether a failed step may
    run again eagerly (only under an "auto" compile: any error in its first step, a compiler error in later ones,
    for example when a new sequence length recompiles). Under CUDA graphs (``graphs``) each step begins a new
    graph generation, and between micro-batches the gradients are copied out of the graphs' memory, which the next
    micro-batch's graphs overwrite (torch's "gradient accumulation" hazard of reduce-overhead); the last
    micro-batch's gradients are read by the optimizer before any graph runs again."""

    def __init__(self, model: nn.Module, backend: str | None, scope: str, auto: bool, mode: str | None = None):
        self.model, self.backend, self.scope = model, backend, scope
        self.auto = auto
        self.may_retry = auto and backend is not None
        self.mode = mode
        self.graphs = backend is not None and mode in GRAPH_MODES  # inductor's; other backends ignore the mode
        self.pointwise = False  # set by compiled_steps when the layers recompute their pointwise work
        self.scaled_swiglu = 0  # gated MLPs routed through ops/scaled_swiglu.py (fast path; at each call: if it applies)

    def describe(self) -> dict:
        """What the steps ran as, for metrics.json (after a fall-back: eager)."""
        on = self.backend is not None
        return {"backend": self.backend if on else None, "scope": self.scope if on else None,
                "mode": self.mode if on else None, "cuda_graphs": self.graphs,
                "recompute_pointwise": self.pointwise and on, "scaled_swiglu_mlps": self.scaled_swiglu}

    def begin_step(self) -> None:
        """Before a step's first forward: a new CUDA graph generation."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def own_grads(self) -> None:
        """After a micro-batch's backward when another follows: the .grad tensors as copies the caching allocator
        owns, so the next backward adds into them. Gradients stay None where a parameter got none (AdamW skips such
        a parameter; a zero gradient would still decay it)."""
        if not self.graphs:
            return
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()

    def fall_back(self, exc: BaseException) -> bool:
        """Called with a step's exception: uncompile and say True when the step may run again eagerly."""
        if self.backend is None or not (self.may_retry or self.auto and _compiler_error(exc)):
            return False
        warnings.warn(f"compiling the decoder layers ({self.backend}) failed; training goes on eagerly from this "
                      f"step: {type(exc).__name__}: {str(exc)[:300]}", RuntimeWarning, stacklevel=2)
        uncompile_model(self.model, self.scope)
        self.backend, self.may_retry, self.graphs = None, False, False
        return True

    def stepped(self) -> None:
        self.may_retry = False


@contextlib.contextmanager
def compiled_steps(args, model: nn.Module, device: torch.device) -> Iterator[CompiledSteps]:
    """Compile ``model`` as ``args.compile`` / ``args.compile_scope`` ask (see ``resolve_compile``) for the
    duration of the block; eager again after it."""
    import torch._functorch.config as functorch_config

    from peftlab.ops.scaled_swiglu import scaled_swiglu_mlps
    from peftlab.quant.bnb import is_quantized
    from peftlab.train.activations import checkpoints_around

    quantized = args.quantize is not None or is_quantized(model)
    memory_first = args.lean_activations or args.gradient_checkpointing or (
        args.checkpointing != "off" and not checkpoints_around(model))  # traced checkpoints: see activations.py
    backend, scope = resolve_compile(args.compile, args.compile_scope, device, quantized, layers_compile(model),
                                     memory_first, checkpointed=args.checkpointing != "off")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    mode = model_compile_mode(model, args.compile_mode, backend, device, args.checkpointing != "off", args.packing,
                              distributed)
    state = CompiledSteps(model, backend, scope, auto=args.compile == "auto", mode=mode)
    graphs = state.graphs
    if backend:
        compile_model(model, backend, scope, mode=mode)
    budget = args.activation_budget
    pointwise = contextlib.nullcontext()
    if resolve_pointwise(args, backend, scope, device, pointwise_gains(model), distributed):
        from peftlab.train.pointwise import recompute_pointwise

        pointwise = recompute_pointwise(model)
        state.pointwise = True
    elif args.recompute_pointwise:
        warnings.warn(f"recompute_pointwise has no effect: the layers run eagerly here (compile {args.compile!r} on "
                      f"{device.type}; see TrainArgs.compile)", RuntimeWarning, stacklevel=3)
    try:  # compiling happens in the steps (first forward, new shapes): the budget is read there
        with functorch_config.patch(activation_memory_budget=budget) if budget else contextlib.nullcontext(), \
                pointwise, scaled_swiglu_mlps(model, device) as state.scaled_swiglu:
            yield state
    finally:
        if state.backend:
            uncompile_model(model, scope)
        if graphs and device.type == "cuda":
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()  # the graphs' memory pool
            # and the compiled code, which holds the trees it ran in: a later run of the same layers would replay
            # their shut-down graphs ("Running CUDAGraph after shutdown", H100, seventeenth session)
            torch._dynamo.reset()


def _compiler_error(exc: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException) or type(exc).__module__.startswith(("torch._inductor", "triton"))


def attached_adapters(model: nn.Module) -> list:
    """Every adapter attached to ``model``: module adapters (one per adapted module) and hook-based ones."""
    from peftlab.core.input_side import hooked

    container = hooked(model)
    hooks = list(container.values()) if container is not None else []
    return [a for m in adapted_modules(model) for a in m.adapters.values()] + hooks


def _all_adapters(model: nn.Module, flag: str) -> bool:
    """Whether every adapter attached to ``model`` has capability ``flag``."""
    return all(getattr(a, flag) for a in attached_adapters(model))


def layers_compile(model: nn.Module) -> bool:
    """Whether every adapter attached to ``model`` runs inside compiled decoder layers (``compiles_in_layers``)."""
    return _all_adapters(model, "compiles_in_layers")


def pads_freely(model: nn.Module) -> bool:
    """Whether extra padding leaves every adapter's outputs and losses alone (``token_local``)."""
    return _all_adapters(model, "token_local")


def model_compile_mode(model: nn.Module, mode: str | None, backend: str | None, device: torch.device,
                       checkpointed: bool, packed: bool = False, distributed: bool = False) -> str | None:
    """``resolve_compile_mode`` with what the model itself decides: its trainable share (``full_parameter`` above
    10%: GaLore, say) and its adapters' capability flags (``token_local``, ``replays_as_graphs``). The trainer's
    choice, and the benchmarks' (bench/train_step_worker.py)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    full_parameter = trainable > 0.1 * sum(p.numel() for p in model.parameters())
    return resolve_compile_mode(mode, backend, device, checkpointed, packed, distributed, full_parameter,
                                not pads_freely(model), not graphs_replay(model))


def graphs_replay(model: nn.Module) -> bool:
    """Whether every adapter's compiled layers have replayed as CUDA graphs on a GPU (``replays_as_graphs``)."""
    return _all_adapters(model, "replays_as_graphs")
