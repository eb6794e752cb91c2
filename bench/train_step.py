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
include compiling; and the trainer's pointwise recompute where its "auto" turns it on, recorded as
``versions.recompute_pointwise``; env PEFTLAB_BENCH_POINTWISE=0: never, the A/B),
``peftlab_compiled_addmm`` (the same with ``ops/mm_add.py``'s in-place addmm pass forced on,
``PEFTLAB_ADDMM_IN_PLACE=1``; the pass is the default since the thirty-fourth session, so the A/B is both impls under
``PEFTLAB_ADDMM_IN_PLACE=0``), ``peftlab_compiled_sdpa_mask`` (the same with a KV prefix's attention left to
transformers' ``sdpa`` and its mask, ``PEFTLAB_PREFIX_FLASH=0``: the A/B of ``ops/prefix_attention.py``),
``peftlab_compiled_prefix_fa2`` (a KV prefix's attention on the flash kernel's bottom-right ``is_causal``, the
thirty-fourth session's form, ``PEFTLAB_PREFIX_FLASH=fa2``),
``peftlab_compiled_lean`` (both: lean nodes inside compiled layers), ``peftlab_compiled_budget`` (compiled
layers keeping a share of their activations, ``TrainArgs.activation_budget``; env PEFTLAB_BENCH_BUDGET, 0.5),
``peftlab_compiled_pointwise`` (compiled layers recomputing their pointwise work, ``TrainArgs.recompute_pointwise``),
``peftlab_compiled_ref`` (compiled layers over the reference path, ``PEFTLAB_FAST=0``: no fused nodes),
``peftlab_liger`` (peftlab's adapters on a model patched by Liger's kernels), ``peft``, ``peft_liger`` and
``unsloth`` (see ``competitors.py``); full fine-tuning runs once, as ``torch``. An implementation whose package is
missing is skipped with the reason stored. Results are rewritten after every run, so a run cut
short by a time limit still leaves its finished configurations. ``PEFTLAB_BENCH_CKPT=on|offload`` runs the peftlab
rows under peftlab's block checkpointing (``--checkpointing``; compiled rows checkpoint around each compiled call),
recorded in the row's versions.

Adding a method is one entry in ``METHODS`` (train_step_methods.py). Any name in ``peftlab.variants()`` works without an
entry: its peftlab config comes from the variant's default factory and PEFT's config is read from
that config's PEFT-format dict (the ``adapter_config.json`` peftlab writes), so both sides run the
same settings by construction. Where PEFT lacks the method or one of its options, its PEFT-based
implementations are skipped with the reason printed and stored in the results; peftlab's still run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere, peftlab from this checkout
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import competitors  # noqa: E402  (bench/competitors.py, beside this file)
from results_io import environment, table_command, write_atomic  # noqa: E402
# the tables of methods, the worker and the markdown table live beside this file; their names stay importable
# from here (arith.py, distributed.py, memory.py, serve.py, serve_overhead.py, train_overhead.py and the tests)
from train_step_methods import (ALL_LINEAR, FORCED_ENV, IMPLS, SHAPES, Unmapped, check_mappings,  # noqa: E402,F401
                                method_entry)
from train_step_table import markdown_table  # noqa: E402
from train_step_worker import build_model, profile_table, run_worker  # noqa: E402,F401


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
    env.update(FORCED_ENV.get(impl, {}))
    if impl in ("peftlab_ref", "peftlab_compiled_ref"):
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
    if "peak_where" in ok[0]:  # PEFTLAB_BENCH_PEAK_WHERE=1: what is alive at each run's peak (bench/peak_where.py)
        row["peak_where"] = [r["peak_where"] for r in ok]
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
