"""Training-step time and peak memory: peftlab, HF PEFT, PEFT + Liger and Unsloth side by side, in one run.

    python bench/train_step.py --shape 1b                      # LoRA, DoRA, full fine-tune
    python bench/train_step.py --shape 1b --impls peftlab,peftlab_ref,peft,peft_liger
    python bench/train_step.py --methods lora,dora --impls peftlab,peft,unsloth --unsloth-site .unsloth_site
    python bench/train_step.py --shape 8b --methods lora,dora  # 8B Llama shape, batch 2
    python bench/train_step.py --shape tiny --device cpu       # smoke run, no GPU
    python bench/train_step.py --table bench/results/X.json    # markdown table from a results file
    python bench/train_step.py --table bench/results/X.json --readme bench/README.md

A Llama-shaped model with random bf16 weights is built from a config (no download). Each
configuration (method x implementation) runs in its own subprocess, so its peak memory is its
own; the order alternates between repeats and between methods, so clock or thermal drift does
not favour one side. The step protocol is that of ``/work/shared/anchors/peft_baseline.py``:
forward with labels, backward, fused AdamW step, ``zero_grad(set_to_none=True)``, synchronise;
median over ``--steps`` steps after ``--warmup`` steps.

Implementations (``--impls``): ``peftlab`` (its default path: fused on CUDA), ``peftlab_ref`` (the
plain-torch reference path, ``PEFTLAB_FAST=0``), ``peftlab_fce`` (its fused linear + cross-entropy
loss, ``TrainArgs.fused_ce``), ``peftlab_lean`` (that loss and the lean RMSNorm / SwiGLU nodes,
``TrainArgs.lean_activations``), ``peftlab_compiled`` (that loss with each decoder layer compiled by
inductor, ``TrainArgs(compile="inductor", compile_scope="layers")``, in the trainer's "auto" compile mode: CUDA
graphs per layer unless checkpointed, env PEFTLAB_BENCH_COMPILE_MODE=default for torch's default; the warm-up steps
include compiling),
``peftlab_compiled_lean`` (both: lean nodes inside compiled layers), ``peftlab_compiled_budget`` (compiled
layers keeping a share of their activations, ``TrainArgs.activation_budget``; env PEFTLAB_BENCH_BUDGET, 0.5),
``peftlab_liger`` (peftlab's adapters on a model patched by Liger's kernels), ``peft``, ``peft_liger`` and
``unsloth`` (see ``competitors.py``); full fine-tuning runs once, as ``torch``. An implementation whose package is
missing is skipped with the reason stored. Results are rewritten after every run, so a run cut
short by a time limit still leaves its finished configurations. ``PEFTLAB_BENCH_CKPT=on|offload`` runs the peftlab
rows under peftlab's block checkpointing (``--checkpointing``; compiled rows checkpoint around each compiled call),
recorded in the row's versions.

Adding a method is one entry in ``METHODS``. Any name in ``peftlab.variants()`` works without an
entry: its peftlab config comes from the variant's default factory and PEFT's config is read from
that config's PEFT-format dict (the ``adapter_config.json`` peftlab writes), so both sides run the
same settings by construction. Where PEFT lacks the method or one of its options, its PEFT-based
implementations are skipped with the reason printed and stored in the results; peftlab's still run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere, peftlab from this checkout
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import competitors  # noqa: E402  (bench/competitors.py, beside this file)
from results_io import environment, table_command, write_atomic  # noqa: E402

from peftlab.compare.peft_backend import PeftUnmapped as Unmapped, to_peft_config  # noqa: E402

IMPLS = ("peftlab", "peftlab_ref", "peftlab_fce", "peftlab_lean", "peftlab_compiled", "peftlab_compiled_lean",
         "peftlab_compiled_budget", "peftlab_liger", "peft", "peft_liger", "unsloth")
COMPILED = ("peftlab_compiled", "peftlab_compiled_lean", "peftlab_compiled_budget", "frozen_compiled")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama 3.2 1B and Llama 3.1 8B shapes; "tiny" keeps every structural feature (GQA, tied head) for CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                            tie_word_embeddings=True), batch=2, seq=64),
    "1b": dict(model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                          tie_word_embeddings=True), batch=4, seq=1024),
    "8b": dict(model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                          tie_word_embeddings=False), batch=2, seq=1024),
}


@dataclass(frozen=True)
class Method:
    """One benchmarked method. ``peftlab`` builds its config from (target_modules, r); None means no
    adapter: a reference run once as ``reference`` ("torch": full fine-tuning; "frozen": the frozen base's
    forward and input-gradient backward, nothing trained). ``peft`` maps that config to PEFT's."""

    label: str
    peftlab: Callable[[list[str], int], Any] | None
    peft: Callable[[Any], Any] | None = to_peft_config
    targets: tuple[str, ...] = tuple(ALL_LINEAR)
    reference: str = "torch"

    def implementations(self, name: str, impls: tuple[str, ...] = ("peftlab", "peft"), peft_ok: bool = True) -> list[str]:
        """The implementations of ``impls`` that can run this method (PEFT-based ones only if ``peft_ok``)."""
        if self.peftlab is None:
            return [self.reference]
        return [i for i in impls if (i != "unsloth" or name in competitors.UNSLOTH_METHODS)
                and (peft_ok or not i.startswith("peft_") and i != "peft")]


def _lora(**extra):
    def build(targets, r):
        import peftlab

        return peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **extra)

    return build


def _boft_one_factor(targets, r):
    import peftlab

    return peftlab.BOFTConfig(boft_block_size=r, boft_n_butterfly_factor=1, target_modules=list(targets))


METHODS: dict[str, Method] = {
    "full": Method("full fine-tune", None, None),
    "frozen": Method("frozen base (forward + input-gradient backward)", None, None, reference="frozen"),
    # the same, treated as peftlab_compiled treats an adapted model (compiled decoder layers, fused cross-entropy):
    # the like-for-like floor of IA3 / VeRA / prompt tuning's "<= 1.05x a frozen-base step" with compiled layers
    "frozen_compiled": Method("frozen base, compiled layers + fused CE", None, None, reference="frozen_compiled"),
    "lora": Method("LoRA r{r}, all linear", _lora()),
    "dora": Method("DoRA r{r}, all linear", _lora(use_dora=True)),
    # PEFT builds BOFT's butterfly factors > 1 only with its CUDA extension (else it silently trains one
    # factor): this entry is the like-for-like comparison, one factor on both sides
    "boft_f1": Method("BOFT block {r}, 1 butterfly factor, all linear", _boft_one_factor),
}


def method_entry(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    import peftlab

    variants = peftlab.variants()
    if name not in variants:
        known = sorted(set(METHODS) | set(variants))
        raise SystemExit(f"unknown method {name!r}; known: {', '.join(known)}")
    return Method(f"{name} (variant default), all linear", lambda targets, r: variants[name](list(targets), r))


# -- worker: one configuration in a fresh process ------------------------------------------------
def build_model(shape: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape]["model"], attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def prepare_model(args, cuda: bool) -> tuple[Any, dict[str, str]]:
    """The model of one configuration, adapted by ``args.impl``; the peak-memory count starts after
    the bf16 base exists (its fp32 random init is a build artefact)."""
    import torch

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
    elif args.impl in ("peft", "peft_liger"):
        import peft

        model = peft.get_peft_model(model, method.peft(method.peftlab(method.targets, args.r)))
    if args.impl in COMPILED:  # TrainArgs(compile="inductor", compile_scope="layers")
        import torch

        from peftlab.train.packing import compile_model, resolve_compile_mode

        model.config.use_cache = False  # no KV cache object in the traced layers (the trainer passes it too)
        backend = os.environ.get("PEFTLAB_BENCH_COMPILE", "inductor")  # the CPU test: aot_eager
        # the trainer's compile_mode "auto" (CUDA graphs per layer unless checkpointed); A/B: "default", ...
        mode = resolve_compile_mode(os.environ.get("PEFTLAB_BENCH_COMPILE_MODE", "auto"), backend,
                                    torch.device(args.device), os.environ.get("PEFTLAB_BENCH_CKPT", "off") != "off")
        compile_model(model, backend, "layers", mode=mode)
        versions["compiled"] = f"{backend}, decoder layers" + (f", mode {mode}" if mode else "")
        if os.environ.get("PEFTLAB_BENCH_COMBO") == "1":  # A/B: inductor's horizontal fusion of independent kernels
            import torch._inductor.config as inductor_config

            inductor_config.combo_kernels = True
            versions["combo_kernels"] = True
        if os.environ.get("PEFTLAB_MM_ADD_OP") is not None:  # A/B: the opaque mm_add op (1) or addmm_ (default)
            versions["mm_add_op"] = os.environ["PEFTLAB_MM_ADD_OP"] == "1"
        if args.impl == "peftlab_compiled_budget":  # TrainArgs.activation_budget (read when the layers compile)
            import torch._functorch.config as functorch_config

            budget = float(os.environ.get("PEFTLAB_BENCH_BUDGET", "0.5"))
            functorch_config.activation_memory_budget = budget
            versions["activation_budget"] = budget
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
    with checkpointing(model, ckpt) if ckpt != "off" else contextlib.nullcontext():
        for i in range(args.warmup + args.steps):
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
    if profile is not None:
        record["profile"] = profile
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


# -- driver --------------------------------------------------------------------------------------
def schedule(plan: dict[str, list[str]], repeats: int) -> list[tuple[str, str]]:
    """Run order of ``plan`` (method -> implementations): within a repeat, the implementations of each
    method alternate in order (forwards, backwards); every other repeat runs the whole sequence backwards."""
    base: list[tuple[str, str]] = []
    for i, (name, here) in enumerate(plan.items()):
        base += [(name, impl) for impl in (here if i % 2 == 0 else here[::-1])]
    order: list[tuple[str, str]] = []
    for k in range(repeats):
        order += base if k % 2 == 0 else base[::-1]
    return order


def check_mappings(methods: list[str], r: int, impls: tuple[str, ...]) -> dict[str, str]:
    """Methods that cannot run on a PEFT-based side -> the reason (built here, before any subprocess);
    their peftlab implementations still run."""
    skipped = {}
    if not any(i.startswith("peft") and not i.startswith("peftlab") for i in impls):
        return skipped
    for name in methods:
        method = method_entry(name)
        if method.peftlab is None:
            continue
        try:
            if method.peft is None:
                raise Unmapped("no PEFT mapping in METHODS")
            method.peft(method.peftlab(method.targets, r))
        except Unmapped as exc:
            skipped[name] = str(exc)
    return skipped


def worker_command(args, method: str, impl: str, profile: bool = False) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method, "--impl", impl,
           "--shape", args.shape, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
           "--r", str(args.r), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return cmd + (["--profile"] if profile else [])


def worker_env(args, impl: str) -> dict[str, str]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ)
    if impl == "unsloth":  # its site folder carries its own trl / datasets: only on the Unsloth runs' path
        paths.insert(0, str(Path(args.unsloth_site).resolve()))
    if impl == "peftlab_ref":
        env["PEFTLAB_FAST"] = "0"
    elif impl.startswith("peftlab"):
        env.pop("PEFTLAB_FAST", None)  # the library's default
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def run_one(args, method: str, impl: str, profile: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(args, method, impl, profile), capture_output=True, text=True,
                              env=worker_env(args, impl), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    wall = round(time.perf_counter() - t0, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:], "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def p10_p90(samples: list[float]) -> list[float]:
    """The 10th and 90th percentiles of the timed steps (one sample: itself twice)."""
    if len(samples) < 2:
        return [samples[0], samples[0]]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return [round(q[0], 3), round(q[-1], 3)]


def summarise(method: str, impl: str, runs: list[dict[str, Any]], args) -> dict[str, Any]:
    entry = method_entry(method)
    row: dict[str, Any] = {"method": method, "impl": impl, "label": entry.label.format(r=args.r)}
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {**row, "error": runs[-1]["error"] if runs else "not run"}
    samples = [s for r in ok for s in r["step_ms_samples"]]
    median = statistics.median(samples)
    row.update(
        trainable_params=ok[0]["trainable_params"], trainable_dtypes=ok[0]["trainable_dtypes"],
        step_ms_median=round(median, 3), step_ms_run_medians=[r["step_ms_median"] for r in ok],
        step_ms_samples=samples, tokens_per_s=round(args.batch * args.seq / (median / 1e3)),
        step_ms_p10_p90=p10_p90(samples),
        final_loss=[r["final_loss"] for r in ok], versions=ok[0].get("versions", {}),
    )
    if "peak_gib" in ok[0]:
        row["peak_gib"] = max(r["peak_gib"] for r in ok)
        row["peak_reserved_gib"] = max(r["peak_reserved_gib"] for r in ok)
    if len(ok) < len(runs):
        row["errors"] = [r["error"] for r in runs if "error" in r]
    return row


def run_driver(args) -> Path:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    impls = tuple(args.impls)
    skipped = check_mappings(methods, args.r, impls)
    skipped_impls = {i: why for i in impls if (why := competitors.missing(i, args.unsloth_site))}
    for name, reason in {**skipped, **skipped_impls}.items():
        print(f"skip {name}: {reason}", flush=True)
    impls = tuple(i for i in impls if i not in skipped_impls)
    plan = {m: method_entry(m).implementations(m, impls, peft_ok=m not in skipped) for m in methods}
    order = schedule(plan, args.repeats)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    log: list[dict[str, Any]] = []
    env = environment(args.device)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / default_name(args, env)
    out.parent.mkdir(parents=True, exist_ok=True)

    def document() -> dict[str, Any]:
        return {
            "benchmark": "train_step",
            "description": "one training step (forward with labels, backward, fused AdamW step, zero_grad); "
                           "step_ms_median is the median over all timed steps of all runs of a configuration; "
                           "peak_gib is torch.cuda.max_memory_allocated from the bf16 base model on (the fp32 "
                           "init of the random base is excluded); each run is a fresh subprocess; the first "
                           "--prime runs (of the first configuration) are discarded",
            "environment": env,
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "table", "readme", "impl", "method")},
            "model": {"family": "LlamaForCausalLM, random weights, bf16, sdpa", **SHAPES[args.shape]["model"]},
            "run_order": [f"{m}/{i}" for m, i in order],
            "configs": [summarise(m, i, results.get((m, i), []), args)
                        for m, here in plan.items() for i in here],
            "skipped": {**{f"{k} (PEFT side)": v for k, v in skipped.items()},
                        **{f"impl {k}": v for k, v in skipped_impls.items()}},
            "runs": log,
        }

    # The first run on a freshly started machine ran ~20% slow in every step (seen twice on an H100),
    # which would fall on whichever configuration is scheduled first: discard it.
    for n in range(args.prime if order else 0):
        record = run_one(args, *order[0])
        log.append({"method": order[0][0], "impl": order[0][1], "discarded": "priming run",
                    **{k: v for k, v in record.items() if k != "step_ms_samples"}})
        print(f"[prime {n + 1}/{args.prime}] {order[0][0]} {order[0][1]}: "
              f"{record.get('error') or str(record['step_ms_median']) + ' ms'} (discarded)", flush=True)
    for n, (method, impl) in enumerate(order, 1):
        record = run_one(args, method, impl)
        results.setdefault((method, impl), []).append(record)
        log.append({"method": method, "impl": impl, **{k: v for k, v in record.items() if k != "step_ms_samples"}})
        shown = record.get("error") or (f"{record['step_ms_median']:.2f} ms, peak {record.get('peak_gib', '-')} GiB, "
                                        f"trainable {record['trainable_params']:,} ({record['wall_s']} s)")
        print(f"[{n}/{len(order)}] {method:>8} {impl:>11}: {shown}", flush=True)
        write_atomic(out, json.dumps(document(), indent=1) + "\n")  # what finished survives a time limit
    profiles = {}
    if args.profile:
        for method, impl in order[:len(order) // max(args.repeats, 1)]:
            record = run_one(args, method, impl, profile=True)
            profiles[f"{method}/{impl}"] = record.get("profile") or record.get("error")
    final = document()
    write_atomic(out, json.dumps(final, indent=1) + "\n")
    if profiles:
        write_atomic(out.with_suffix(".profile.txt"), "\n\n".join(f"=== {k}\n{v}" for k, v in profiles.items()) + "\n")
    print(f"wrote {out}")
    print(markdown_table(final))
    return out


def default_name(args, env: dict[str, Any]) -> str:
    device = re.sub(r"[^a-z0-9]+", "-", (env.get("gpu") or "cpu").lower()).strip("-")
    stamp = env["date"][:10]
    return f"train_step_{args.shape}_{device}_{stamp}.json"


# -- tables --------------------------------------------------------------------------------------
COMPETITORS = (("peft", "PEFT"), ("peft_liger", "PEFT+Liger"), ("unsloth", "Unsloth"))


def _ratio(row: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """"time x / memory x" of ``row`` against ``ref`` (same method, another implementation)."""
    if not ref or "error" in ref or ref is row:
        return ""
    text = f"{row['step_ms_median'] / ref['step_ms_median']:.2f}x"
    if row.get("peak_gib") and ref.get("peak_gib"):
        text += f" / {row['peak_gib'] / ref['peak_gib']:.2f}x"
    return text


def markdown_table(document: dict[str, Any]) -> str:
    """One row per configuration; peftlab rows get time / memory ratios against each competitor that
    ran the same method in this run, and against LoRA in the same peftlab implementation (the issue's
    targets)."""
    env, args, configs = document["environment"], document["args"], document["configs"]
    rows = {(c["method"], c["impl"]): c for c in configs if "error" not in c}
    present = {c["impl"] for c in configs}
    competitors_here = [(impl, name) for impl, name in COMPETITORS if impl in present]
    has_mem = any("peak_gib" in c for c in configs)
    has_lora = any(m == "lora" and i.startswith("peftlab") for m, i in rows)
    header = ["method", "impl", "trainable params", "step ms (p10-p90)", "tokens/s"] + (["peak GiB"] if has_mem else [])
    suffix = " (time / mem)" if has_mem else ""
    header += [f"vs {name}{suffix}" for _, name in competitors_here]
    header += [f"vs peftlab LoRA, same impl{suffix}"] if has_lora else []
    frozen = {False: rows.get(("frozen", "frozen")), True: rows.get(("frozen_compiled", "frozen_compiled"))}
    header += ["time vs frozen base, same treatment"] if any(frozen.values()) else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for c in configs:
        if "error" in c:
            lines.append(f"| {c['label']} | {c['impl']} | error: {c['error'][:120]} |" + " |" * (len(header) - 3))
            continue
        ours = c["impl"].startswith("peftlab")
        peft_row = rows.get((c["method"], "peft"))
        trainable = f"{c['trainable_params']:,}"
        if ours and peft_row and peft_row["trainable_params"] != c["trainable_params"]:
            trainable += f" (PEFT: {peft_row['trainable_params']:,})"
        spread = c.get("step_ms_p10_p90")
        step = f"{c['step_ms_median']:.2f}" + (f" ({spread[0]:.1f}-{spread[1]:.1f})" if spread else "")
        cells = [c["label"], c["impl"], trainable, step, f"{c['tokens_per_s']:,}"]
        if has_mem:
            cells.append(f"{c['peak_gib']:.2f}")
        cells += [_ratio(c, rows.get((c["method"], impl))) if ours else "" for impl, _ in competitors_here]
        if has_lora:
            cells.append(_ratio(c, rows.get(("lora", c["impl"]))) if ours else "")
        if any(frozen.values()):
            floor = frozen[c["impl"] in COMPILED]  # compiled rows against the compiled frozen step, eager ones eager
            cells.append(f"{c['step_ms_median'] / floor['step_ms_median']:.2f}x" if ours and floor else "")
        lines.append("| " + " | ".join(cells) + " |")
    device = env.get("gpu") or f"CPU ({env.get('cpu')})"
    runs = args["repeats"]
    caption = (f"{device}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
               f"peftlab {env['peftlab']} (commit {env['commit'][:10]}, source {env['peftlab_source_sha256']}); "
               f"shape {args['shape']}, batch {args['batch']} x {args['seq']}, r {args['r']}; median of "
               f"{runs} x {args['steps']} steps after {args['warmup']} warm-up steps per run; "
               f"TF32 matmul {'on' if env['tf32_matmul'] else 'off'}.")
    versions = sorted({f"{k} {v}" for c in configs for k, v in c.get("versions", {}).items() if k != "peftlab_fast"})
    caption += f" Competitors: {', '.join(versions)}." if versions else ""
    skipped = "".join(f"\nSkipped {k}: {v}." for k, v in document.get("skipped", {}).items())
    return "\n".join(lines) + "\n\n" + caption + skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--methods", default="lora,dora,full",
                   help="comma-separated: entries of METHODS or any name in peftlab.variants()")
    p.add_argument("--batch", type=int, help="default: the shape's (1b: 4, 8b: 2, tiny: 2)")
    p.add_argument("--seq", type=int, help="default: the shape's (1024; tiny: 64)")
    p.add_argument("--impls", default="peftlab,peft", type=lambda v: [i.strip() for i in v.split(",") if i.strip()],
                   help=f"comma-separated, of {', '.join(IMPLS)} (full fine-tuning always runs as torch)")
    p.add_argument("--unsloth-site", help="folder built by unsloth_site.sh (for --impls unsloth)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration, in alternating order")
    p.add_argument("--prime", type=int, default=1, help="discarded runs of the first configuration before timing")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--timeout", type=int, default=600, help="seconds per subprocess")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table per configuration")
    p.add_argument("--out", help="results JSON (default: bench/results/train_step_<shape>_<gpu>_<date>.json)")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    p.add_argument("--readme", metavar="README", help="with --table: also write the table into this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=[*IMPLS, "torch", "frozen", "frozen_compiled"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown --impls {unknown}; choose from {', '.join(IMPLS)}")
    shape = SHAPES[args.shape]
    args.batch = args.batch or shape["batch"]
    args.seq = args.seq or shape["seq"]
    if args.device is None and not args.table:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        table_command(args.table, args.readme, markdown_table)
    elif args.worker:
        print(json.dumps(run_worker(args)), flush=True)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
