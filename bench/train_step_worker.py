"""bench/train_step.py's worker: one configuration (method x implementation) built and timed in a fresh process."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable

import competitors  # bench/competitors.py, beside this file (bench/train_step.py puts bench/ on sys.path)
import peak_where
from train_step_methods import ALL_LINEAR, COMPILED, FORCED_ENV, SHAPES, method_entry


def build_model(shape: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape]["model"], attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16)


_KEEP: list = []  # contexts entered for the worker's lifetime


def set_inductor_config(spec: str) -> str:
    """Set inductor's config from "name=value,..." (a dotted name reaches a sub-config: ``triton.x``; values 0/1
    are booleans where the setting is one, else ints, floats or strings); returns the spec as applied."""
    import torch._inductor.config as inductor_config

    applied = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"PEFTLAB_BENCH_INDUCTOR: {item!r} is not name=value")
        owner, _, leaf = name.rpartition(".")
        target = inductor_config
        for part in filter(None, owner.split(".")):
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise SystemExit(f"PEFTLAB_BENCH_INDUCTOR: inductor has no setting {name!r}")
        current = getattr(target, leaf)
        if isinstance(current, bool):
            value = text.strip().lower() in ("1", "true")
        elif isinstance(current, (int, float)):
            value = type(current)(text)
        else:
            value = text
        setattr(target, leaf, value)
        applied.append(f"{name}={value}")
    return ",".join(applied)


def prepare_model(args, cuda: bool) -> tuple[Any, dict[str, str]]:
    """The model of one configuration, adapted by ``args.impl``; the peak-memory count starts after
    the bf16 base exists (its fp32 random init is a build artefact)."""
    import torch

    from peftlab.ops import prefix_attention
    from peftlab.ops.mm_add import addmm_pass_enabled
    from peftlab.train.args import TrainArgs
    from peftlab.train.packing import (compile_model, layers_compile, model_compile_mode, pointwise_gains,
                                       resolve_pointwise)

    def start_peak():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    if args.impl == "unsloth":
        model, version = competitors.unsloth_model(SHAPES[args.shape]["model"], args.method, ALL_LINEAR, args.r,
                                                   args.seq, start_peak)
        return model, {"unsloth": version}
    versions = {}
    if args.impl.endswith("_liger"):
        from importlib.metadata import version

        competitors.apply_liger()
        versions["liger_kernel"] = version("liger_kernel")
    method = method_entry(args.method)
    model = build_model(args.shape, args.device)
    start_peak()
    if args.impl in ("frozen", "frozen_compiled"):  # gradients flow back to the embeddings' output, nothing trains
        model.requires_grad_(False)
        model.enable_input_require_grads()
    if args.impl.startswith("peftlab"):
        import peftlab
        from peftlab.ops import fast

        peftlab.attach(model, method.peftlab(method.targets, args.r))
        versions["peftlab_fast"] = str(fast.enabled(torch.empty(0, device=args.device)))
        if args.impl in ("peftlab_lean", "peftlab_compiled_lean"):
            from peftlab.ops.lean import use_lean_modules

            versions["lean_modules"] = use_lean_modules(model)
        if os.environ.get("PEFTLAB_BENCH_SCALED_SWIGLU") != "0":  # ops/scaled_swiglu.py, as in the trainer's steps
            from peftlab.ops.scaled_swiglu import use_scaled_swiglu

            if fast.enabled(torch.empty(0, device=args.device)) and (n := len(use_scaled_swiglu(model))):
                versions["scaled_swiglu_mlps"] = n
    elif args.impl in ("peft", "peft_liger"):
        import peft

        model = peft.get_peft_model(model, method.peft(method.peftlab(method.targets, args.r)))
    if args.impl in COMPILED and not layers_compile(model):  # no peftlab adapter (frozen, PEFT): True
        versions["compiled"] = "no: an adapter trains eagerly (compiles_in_layers), as the trainer runs it"
    elif args.impl in COMPILED:  # TrainArgs(compile="inductor", compile_scope="layers")
        model.config.use_cache = False  # no KV cache object in the traced layers (the trainer passes it too)
        backend = os.environ.get("PEFTLAB_BENCH_COMPILE", "inductor")  # the CPU test: aot_eager
        # the trainer's compile_mode "auto" (CUDA graphs per layer unless checkpointed); A/B: "default", ...
        mode = model_compile_mode(model, os.environ.get("PEFTLAB_BENCH_COMPILE_MODE", "auto"), backend,
                                  torch.device(args.device), os.environ.get("PEFTLAB_BENCH_CKPT", "off") != "off")
        compile_model(model, backend, "layers", mode=mode)
        versions["compiled"] = f"{backend}, decoder layers" + (f", mode {mode}" if mode else "")
        if os.environ.get("PEFTLAB_BENCH_COMBO") == "1":  # A/B: inductor's horizontal fusion of independent kernels
            set_inductor_config("combo_kernels=1")
            versions["combo_kernels"] = True
        if os.environ.get("PEFTLAB_BENCH_INDUCTOR"):  # A/B: inductor settings, "triton.prefer_nd_tiling=1,..."
            versions["inductor_config"] = set_inductor_config(os.environ["PEFTLAB_BENCH_INDUCTOR"])
        versions["addmm_in_place"] = addmm_pass_enabled()  # ops/mm_add.py's pass
        versions["attention"] = getattr(model.config, "_attn_implementation", None)  # peftlab_sdpa: a KV prefix
        if versions["attention"] == prefix_attention.NAME:  # its form: SDPA's causal on padded queries, or flash's
            versions["prefix_attention"] = "flash bottom-right" if prefix_attention._FA2 else "sdpa causal, padded q"
        if os.environ.get("PEFTLAB_MM_ADD_OP") is not None:  # A/B: the opaque mm_add op (1) or addmm_ (default)
            versions["mm_add_op"] = os.environ["PEFTLAB_MM_ADD_OP"] == "1"
        if args.impl == "peftlab_compiled_budget":  # TrainArgs.activation_budget (read when the layers compile)
            import torch._functorch.config as functorch_config

            budget = float(os.environ.get("PEFTLAB_BENCH_BUDGET", "0.5"))
            functorch_config.activation_memory_budget = budget
            versions["activation_budget"] = budget
        # TrainArgs.recompute_pointwise, for the worker's lifetime: forced on (_pointwise), or the trainer's "auto"
        # (peftlab_compiled; PEFTLAB_BENCH_POINTWISE=0: off, the A/B)
        auto = (args.impl == "peftlab_compiled" or args.impl in FORCED_ENV) and \
            os.environ.get("PEFTLAB_BENCH_POINTWISE") != "0" and \
            resolve_pointwise(TrainArgs(checkpointing=os.environ.get("PEFTLAB_BENCH_CKPT", "off")), backend, "layers",
                              torch.device(args.device), pointwise_gains(model))
        versions["recompute_pointwise"] = False
        if args.impl == "peftlab_compiled_pointwise" or auto:
            from peftlab.train.pointwise import recompute_pointwise

            context = recompute_pointwise(model)
            context.__enter__()
            _KEEP.append(context)  # unreferenced, the generator's cleanup would unwrap the layers at once (it did on
            # the H100 in the seventeenth session: that row ran without the flag)
            versions["recompute_pointwise"] = True
    # A/B knobs: the fused loss's chunks (ops/fused_ce.py), the final norm compiled with the layers (train/packing.py)
    # DoRA's saved output (ops/fast.py), cached ||W0||^2 and rank-r norm products (methods/dora.py), and the recompute
    # policy's per-module rule (train/pointwise.py)
    for knob in ("PEFTLAB_CE_CHUNK_MIB", "PEFTLAB_CE_CHUNK_ALIGN", "PEFTLAB_COMPILE_FINAL_NORM",
                 "PEFTLAB_DORA_SHARE_OUTPUT", "PEFTLAB_DORA_NORM_CACHE", "PEFTLAB_DORA_RANK_GEMM",
                 "PEFTLAB_POINTWISE_SAVE_SMALL"):
        if os.environ.get(knob):
            versions[knob.removeprefix("PEFTLAB_").lower()] = os.environ[knob]
    return model, versions


def run_worker(args) -> dict[str, Any]:
    import torch

    cuda = args.device.startswith("cuda")
    model, versions = prepare_model(args, cuda)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes: dict[str, int] = {}
    for p in params:
        dtypes[str(p.dtype).removeprefix("torch.")] = dtypes.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    batch, seq = args.batch, args.seq
    x = torch.randint(0, SHAPES[args.shape]["model"]["vocab_size"], (batch, seq), device=args.device)
    loss_of = step_loss(args.impl, model, x)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    samples = []
    ckpt = os.environ.get("PEFTLAB_BENCH_CKPT", "off")  # A/B: peftlab's block checkpointing (on | offload)
    if ckpt != "off":
        from peftlab.train.activations import checkpointing, compiled_placement

        if not args.impl.startswith("peftlab"):
            raise SystemExit(f"PEFTLAB_BENCH_CKPT is peftlab's checkpointing; {args.impl} has its own")
        versions["checkpointing"] = ckpt + (f", {compiled_placement()}" if args.impl in COMPILED else "")
    def train_step():
        loss = loss_of()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    where = cuda and os.environ.get("PEFTLAB_BENCH_PEAK_WHERE") == "1"  # where the peak is (slows the host: no timing)
    marks: list = []
    before = peak_where.start() if where else 0
    with checkpointing(model, ckpt) if ckpt != "off" else contextlib.nullcontext():
        for i in range(args.warmup + args.steps):
            if where:
                peak_where.mark(marks, f"warm-up step {i}" if i < args.warmup else f"timed step {i - args.warmup}")
            sync()
            t0 = time.perf_counter()
            loss = train_step()
            sync()
            if i >= args.warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
        profile = profile_table(train_step, cuda) if args.profile else None
    record = {
        "trainable_params": sum(p.numel() for p in params),
        "trainable_dtypes": dtypes,
        "step_ms_samples": [round(s, 3) for s in samples],
        "step_ms_median": round(statistics.median(samples), 3),
        "final_loss": round(float(loss), 4),
        "versions": versions,
    }
    if cuda:
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    if where:
        record["peak_where"] = peak_where.finish(marks, before)
    if profile is not None:
        record["profile"] = profile
    if "recompute_pointwise" in versions:  # still wrapped after the steps (the wrapping was lost once, see _KEEP)
        from peftlab.core.blocks import decoder_blocks

        versions["recompute_pointwise"] = all("forward" in b.__dict__ for b in decoder_blocks(model))
    return record


def step_loss(impl: str, model, x) -> Callable[[], Any]:
    """The step's loss: the model's own, or (``peftlab_fce``) peftlab's fused linear + cross-entropy,
    which never holds the (tokens, vocab) logits (``TrainArgs.fused_ce`` in training)."""
    if impl in ("peftlab_fce", "peftlab_lean") or impl in COMPILED:
        from peftlab.train.fused_loss import check_fused_ce, fused_causal_lm_loss

        check_fused_ce(model)
        return lambda: fused_causal_lm_loss(model, {"input_ids": x, "labels": x})
    return lambda: model(input_ids=x, labels=x).loss


def profile_table(run_step: Callable[[], Any], cuda: bool, steps: int = 3) -> str:
    """torch.profiler's table of ``steps`` calls of ``run_step`` (one whole training step each), by device time on
    CUDA, else by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
