"""Where a served batch's time goes (issue 8), on the engine and adapters of ``bench/serve.py``.

For the base model, one LoRA adapter, 100 LoRA adapters, the LoRA + DoRA + IA3 + VeRA mix and one MoLoRA and one
bottleneck adapter (the routed and sub-layer tables: thirtieth session): the wall time of
each step kind over one workload with CUDA graphs on (eager steps, i.e. prefill or prefill + decode, and graph
replays of pure decode steps), and a torch.profiler table of pure decode steps run as the same fixed-shape step
without capture (kernels by name: launches per step and GPU microseconds per step).

    python bench/serve_profile.py --out bench/results/serve/profile_1b_h200.json
    python bench/serve_profile.py --smoke --out /tmp/p.json          # CPU, tiny shape
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as sb  # noqa: E402  (bench/serve.py)
import torch  # noqa: E402

from peftlab.serve.graphs import DecodeGraphs  # noqa: E402


def step_times(engine, names, args, vocab: int, seed: int) -> dict:
    """One workload with every step synchronised and timed, split by whether it ran as a graph replay."""
    times: dict[str, list[float]] = defaultdict(list)
    real = engine.step

    def step():
        before = engine.graphs.steps_run
        sb._sync(args.device)
        t0 = time.perf_counter()
        ran = real()
        sb._sync(args.device)
        kind = "decode, fixed-shape step" if engine.graphs.steps_run > before else "eager (prefill in it)"
        times[kind].append(time.perf_counter() - t0)
        return ran

    engine.step = step
    try:
        res = sb.workload(engine, names, args, vocab, seed)
    finally:
        del engine.step
    return {"tokens_per_s": res["tokens_per_s"], "wall_s": res["wall_s"],
            "steps": {k: {"count": len(v), "total_ms": round(1e3 * sum(v), 2),
                          "median_ms": round(1e3 * sorted(v)[len(v) // 2], 3)} for k, v in times.items()}}


def _rows(kernels: dict[str, list[float]], n: int, top: int = 25) -> dict:
    rows = sorted(((k, len(v) / n, sum(v) / n) for k, v in kernels.items()), key=lambda r: -r[2])
    return {"launches_per_step": round(sum(r[1] for r in rows), 1), "gpu_us_per_step": round(sum(r[2] for r in rows), 1),
            "kernels": [{"name": k[:120], "per_step": round(c, 2), "us_per_step": round(t, 1)} for k, c, t in rows[:top]]}


def kernel_table(engine, names, args, vocab: int) -> dict:
    """Kernels of the pure decode steps of one batch, the fixed-shape step run without capture; and of its eager
    (prefill) steps, with their host wall time and the operators that take the host's time."""
    from torch.profiler import ProfilerActivity, profile

    engine.graphs.capture = False
    engine.graphs.invalidate()
    counts = {"decode": 0, "eager": 0}
    real = engine.step
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    kernels: dict[str, dict[str, list[float]]] = {"decode": defaultdict(list), "eager": defaultdict(list)}
    host_ops: dict[str, float] = defaultdict(float)
    eager_wall: list[float] = []

    def step():
        kind = "eager" if engine.waiting or any(not r.output for r in engine.running) else "decode"
        sb._sync(args.device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            ran = real()
            sb._sync(args.device)
        counts[kind] += 1
        if kind == "eager":
            eager_wall.append(time.perf_counter() - t0)
            for avg in prof.key_averages():
                host_ops[avg.key] += avg.self_cpu_time_total
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[kind][e.name].append(e.time_range.elapsed_us())
        return ran

    engine.step = step
    try:
        sb.workload(engine, names[:args.batch], args, vocab, seed=5)
    finally:
        del engine.step
        engine.graphs.capture = args.device.startswith("cuda")
        engine.graphs.invalidate()
    n_eager = max(counts["eager"], 1)
    eager = {"steps": counts["eager"], "wall_ms_per_step_profiled": round(1e3 * sum(eager_wall) / n_eager, 2),
             **_rows(kernels["eager"], n_eager, top=12),
             "host_ops_total_us": round(sum(host_ops.values()) / n_eager, 1),  # the rest of the wall: Python, Triton
             "host_ops": [{"op": k[:100], "self_cpu_us_per_step": round(v / n_eager, 1)}
                          for k, v in sorted(host_ops.items(), key=lambda kv: -kv[1])[:15]]}
    return {"decode_steps": counts["decode"], **_rows(kernels["decode"], max(counts["decode"], 1)), "eager": eager}


def main(argv=None) -> None:
    args = sb.parse_args(list(sys.argv[1:] if argv is None else argv) + ["--cuda-graphs"])  # --out: serve.py's option
    out = args.out
    vocab = sb.SHAPES[args.shape]["model"]["vocab_size"]
    engine, _ = sb.build_engine(args)
    engine.graphs = DecodeGraphs(engine.model, engine.cache, engine.context, engine.layers)
    n = args.requests
    hundred = min(100, max(args.adapters))
    scenarios = {"base model": [None] * n, "1 adapter": ["lora0"] * n,
                 f"{hundred} adapters": [f"lora{i % hundred}" for i in range(n)],
                 "LoRA + DoRA + IA3 + VeRA": [sb.MIXED[i % len(sb.MIXED)] for i in range(n)],
                 **{f"1 adapter, {name}": [name] * n for name in ("molora", "bottleneck")}}
    doc = {"environment": sb.environment(args.device), "args": {"shape": args.shape, "batch": args.batch,
                                                                 "prompt": args.prompt, "new": args.new,
                                                                 "requests": n}, "scenarios": {}}
    # every scenario's step times first: once the profiler has run, its hooks stay and slow later launches (seen on
    # the H200: the first run of this script timed the scenarios after the first profile 1.5x slower than serve.py)
    for label, names in scenarios.items():
        sb.workload(engine, names, args, vocab, seed=1)  # untimed: adapters in their slots, graphs captured
        doc["scenarios"][label] = step_times(engine, names, args, vocab, seed=2)
        print(label, json.dumps(doc["scenarios"][label]["steps"]), flush=True)
    for label, names in scenarios.items():
        sb.workload(engine, names, args, vocab, seed=1)
        doc["scenarios"][label]["profile"] = p = kernel_table(engine, names, args, vocab)
        print(label, p["launches_per_step"], p["gpu_us_per_step"], flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    for label, s in doc["scenarios"].items():
        print(f"\n## {label}: {s['tokens_per_s']} tokens/s; steps {json.dumps(s['steps'])}")
        p = s["profile"]
        print(f"fixed-shape decode step without capture: {p['launches_per_step']} kernels, "
              f"{p['gpu_us_per_step']} GPU us per step")
        for k in p["kernels"][:12]:
            print(f"  {k['us_per_step']:9.1f} us  {k['per_step']:6.1f}x  {k['name'][:90]}")
        e = p["eager"]
        print(f"eager steps (profiled, {e['steps']}): {e['wall_ms_per_step_profiled']} ms wall, "
              f"{e['launches_per_step']} kernels, {e['gpu_us_per_step']} GPU us per step, "
              f"{e['host_ops_total_us']} us in torch operators on the host")
        for k in e["kernels"]:
            print(f"  {k['us_per_step']:9.1f} us  {k['per_step']:6.1f}x  {k['name'][:90]}")
        for o in e["host_ops"]:
            print(f"  host {o['self_cpu_us_per_step']:9.1f} us  {o['op']}")


if __name__ == "__main__":
    main()
