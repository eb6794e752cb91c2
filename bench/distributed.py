"""LoRA training throughput on 1 vs N GPUs through torchrun (DDP and FSDP2): tokens/s and scaling efficiency.

    python bench/distributed.py --shapes 1b,8b --nprocs 1,2          # GPU: every (shape, strategy, N)
    python bench/distributed.py --shapes tiny --device cpu --nprocs 1,2 --steps 2 --warmup 1   # CPU smoke run
    python bench/distributed.py --table bench/results/distributed/FILE.json [--readme README.md]

Weak scaling: every process trains on its own ``--batch`` x ``--seq`` tokens per step (the shape's
default: 1b 4 x 1024, 8b 2 x 1024), so N processes take steps of N times the tokens. A step is the
training loop's (``peftlab.train.step.accumulate_gradients`` with the distributed runtime, then a fused
AdamW step and ``zero_grad``); its time is the slowest process's. tokens/s = global tokens per step /
median step time. Scaling efficiency of N processes = tokens/s(N) / (N x tokens/s(1)), both with the
same strategy; ``none`` (one process, no torch.distributed) is the single-GPU reference for the cost of
the wrappers themselves. Each configuration runs in fresh processes; N larger than the visible GPUs is
recorded as not run, never estimated. The model is a Llama-shaped ``LlamaForCausalLM`` with random
bf16 weights (shapes from ``bench/train_step.py``), LoRA r16 on every linear layer of the blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):  # run as a file from anywhere: peftlab from this checkout
    if path not in sys.path:
        sys.path.insert(0, path)

from train_step import ALL_LINEAR, SHAPES, build_model, environment, table_command  # noqa: E402

STRATEGIES = ("ddp", "fsdp")


# -- worker: one process of one configuration ------------------------------------------------
def run_worker(args) -> None:
    """One process of one configuration; rank 0 prints the record as one JSON line for the driver."""
    import torch
    import torch.distributed as dist

    import peftlab
    from peftlab.train import distributed
    from peftlab.train.step import accumulate_gradients

    runtime = distributed.start(args.strategy, args.device)
    device = runtime.device or torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # CPU smoke runs: one thread per process (busy OpenMP threads starve gloo's and DDP's threads)
        torch.set_num_threads(1)
    model = build_model(args.shape, str(device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peftlab.attach(model, peftlab.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=ALL_LINEAR))
    model.train()
    runtime.place(model, device)
    forward = runtime.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    generator = torch.Generator().manual_seed(runtime.rank)
    ids = torch.randint(0, SHAPES[args.shape]["model"]["vocab_size"], (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    samples, loss = [], float("nan")
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss, _ = accumulate_gradients(forward, [batch], device, runtime)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        if runtime.world_size > 1:  # a step ends when its slowest process does
            elapsed = elapsed.to(runtime.comm_device())
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            samples.append(elapsed.item() * 1e3)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], dtype=torch.float64)
    if runtime.world_size > 1:
        peak = peak.to(runtime.comm_device())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    median = statistics.median(samples)
    record = {
        "step_ms_samples": [round(s, 3) for s in samples], "step_ms_median": round(median, 3),
        "tokens_per_step": args.batch * args.seq * runtime.world_size,
        "tokens_per_s": round(args.batch * args.seq * runtime.world_size / (median / 1e3), 1),
        "trainable_params": sum(p.numel() for p in params), "final_loss": round(loss, 4),
        "distributed": runtime.describe(),
    }
    if cuda:
        record["peak_gib_max_over_processes"] = round(peak.item(), 3)
    runtime.close()
    if runtime.is_main:
        print(json.dumps(record), flush=True)


# -- driver ------------------------------------------------------------------------------------
def configurations(args) -> list[tuple[str, str, int]]:
    """(shape, strategy, processes): the single-process reference first, then each strategy by N."""
    out = []
    for shape in args.shapes:
        out.append((shape, "none", 1))
        out += [(shape, strategy, n) for n in args.nprocs for strategy in args.strategies]
    return out


def worker_command(args, shape: str, strategy: str, nproc: int) -> list[str]:
    script = [str(Path(__file__).resolve()), "--worker", "--shape", shape, "--strategy", strategy,
              "--device", args.device, "--r", str(args.r), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--seq", str(args.seq or SHAPES[shape]["seq"]), "--batch", str(args.batch or SHAPES[shape]["batch"])]
    if strategy == "none":
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            script[0], "--", *script[1:]]


def run_one(args, shape: str, strategy: str, nproc: int, timeout: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": shape, "strategy": strategy, "nproc": nproc,
                           "batch_per_process": args.batch or SHAPES[shape]["batch"], "seq": args.seq or SHAPES[shape]["seq"]}
    if nproc > args.devices:
        return {**row, "not_run": f"{nproc} processes need {nproc} GPUs; {args.devices} visible"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":  # one host: gloo on loopback, not on whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = args.timeout if timeout is None else timeout
    started = time.perf_counter()
    proc = subprocess.Popen(worker_command(args, shape, strategy, nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM (they run in sessions of their own)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        text = (stderr or stdout).strip().splitlines()
        # the workers' own words (a C++ abort's "what():", a Python error) come before torchrun's summary at the end
        cause = [line.strip() for line in text if any(k in line for k in ("what():", "Error", "terminate called"))]
        return {**row, "error": f"exit {proc.returncode}: " + " | ".join(cause[:3] + text[-4:])[-1200:]}
    return {**row, **json.loads(lines[-1])}


def scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Efficiency of every measured N > 1 against the same shape and strategy on one process."""
    measured = {(r["shape"], r["strategy"], r["nproc"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    out = []
    for (shape, strategy, n), tps in measured.items():
        one = measured.get((shape, strategy, 1))
        if n > 1 and one:
            out.append({"shape": shape, "strategy": strategy, "nproc": n, "efficiency": round(tps / (n * one), 4)})
    return out


def run_driver(args) -> Path:
    """Every configuration in turn; the results file is rewritten after each, so a run cut short by a
    time limit still leaves what it measured."""
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "distributed" / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "distributed",
        "description": __doc__.split("\n\n", 2)[2].strip(),
        "environment": environment(args.device),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "table", "readme", "shape", "strategy")},
        "models": {s: {"family": "LlamaForCausalLM, random weights, bf16, sdpa", **SHAPES[s]["model"]}
                   for s in args.shapes},
        "configs": [],
        "scaling": [],
    }
    started = time.perf_counter()
    for shape, strategy, nproc in configurations(args):
        left = args.budget - (time.perf_counter() - started) if args.budget else float("inf")
        if left < 15:
            row = {"shape": shape, "strategy": strategy, "nproc": nproc, "batch_per_process": args.batch or
                   SHAPES[shape]["batch"], "seq": args.seq or SHAPES[shape]["seq"],
                   "not_run": f"the --budget of {args.budget} s was spent"}
        else:
            row = run_one(args, shape, strategy, nproc, timeout=min(args.timeout, left))
        document["configs"].append(row)
        document["scaling"] = scaling(document["configs"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1) + "\n")
        tmp.replace(out)
        shown = row.get("not_run") or row.get("error") or (
            f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_ms_median']:.1f} ms/step, "
            f"peak {row.get('peak_gib_max_over_processes', '-')} GiB ({row['wall_s']} s)")
        print(f"{shape:>5} {strategy:>5} x{nproc}: {shown}", flush=True)
    print(f"wrote {out}")
    print(markdown_table(document))
    return out


def markdown_table(document: dict[str, Any]) -> str:
    env, args = document["environment"], document["args"]
    efficiency = {(s["shape"], s["strategy"], s["nproc"]): s["efficiency"] for s in document["scaling"]}
    lines = ["| shape | strategy | processes | batch / process | tokens/s | tokens/s per process | step ms | "
             "scaling efficiency | peak GiB |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in document["configs"]:
        head = f"| {r['shape']} | {r['strategy']} | {r['nproc']} | {r['batch_per_process']} x {r['seq']} |"
        if "tokens_per_s" not in r:
            lines.append(f"{head} {'not run: ' + r['not_run'] if 'not_run' in r else 'error: ' + r['error'][:160]}"
                         " | | | | |")
            continue
        eff = efficiency.get((r["shape"], r["strategy"], r["nproc"]))
        eff_cell = f"{eff:.2f}" if eff is not None else ("reference" if r["nproc"] == 1 else "n/a")
        peak = r.get("peak_gib_max_over_processes")
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / r['nproc']:,.0f} | "
                     f"{r['step_ms_median']:.1f} | {eff_cell} | {'-' if peak is None else f'{peak:.2f}'} |")
    device = env.get("gpu") or f"CPU ({env.get('cpu')})"
    caption = (f"{device}; torch {env['torch']}, transformers {env['transformers']}, peftlab {env['peftlab']} "
               f"(commit {env['commit'][:10]}, source {env['peftlab_source_sha256']}); LoRA r{args['r']} on every "
               f"linear layer of the blocks; median of {args['steps']} steps after {args['warmup']} warm-up steps; "
               "scaling efficiency = tokens/s(N) / (N x tokens/s(1)) for the same strategy.")
    return "\n".join(lines) + "\n\n" + caption


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="1b,8b", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--nprocs", default="1,2", help="process counts, one GPU each")
    p.add_argument("--strategies", default="ddp,fsdp", help=f"comma-separated, from {STRATEGIES}")
    p.add_argument("--batch", type=int, help="per process (default: the shape's: 1b 4, 8b 2, tiny 2)")
    p.add_argument("--seq", type=int, help="default: the shape's (1024; tiny 64)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    p.add_argument("--budget", type=int, default=0, help="seconds for the whole run (0: no limit); configurations "
                   "that no longer fit are recorded as not run")
    p.add_argument("--out", help="results JSON (default: bench/results/distributed/distributed.json)")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    p.add_argument("--readme", metavar="README", help="with --table: also write the table into this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        return args
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        return args
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.nprocs = sorted({int(n) for n in args.nprocs.split(",")})
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for name, values, known in (("shape", args.shapes, SHAPES), ("strategy", args.strategies, STRATEGIES)):
        unknown = [v for v in values if v not in known]
        if unknown:
            p.error(f"unknown {name} {unknown[0]!r}; known: {', '.join(sorted(known))}")
    # processes on the CPU share the host; on a GPU machine each needs its own device
    args.devices = torch.cuda.device_count() if args.device.startswith("cuda") else max(args.nprocs)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        return table_command(args.table, args.readme, markdown_table)
    (run_worker if args.worker else run_driver)(args)


if __name__ == "__main__":
    main()
