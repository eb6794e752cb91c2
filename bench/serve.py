"""Multi-adapter serving throughput and latency: the peftlab engine and HF PEFT side by side, one run.

    python bench/serve.py --out bench/results/serve/serve_1b.json        # GPU: 1B Llama shape, bf16
    python bench/serve.py --smoke --out /tmp/serve_smoke.json            # CPU smoke run (tiny shape)
    python bench/serve.py --table bench/results/serve/X.json --readme README.md

Model: Llama-shaped, random weights built from a config (``bench/train_step.SHAPES``). Adapters: LoRA
r16 alpha 32 on all linear layers of every block, random weights, built on the served base through the
same path as a loaded checkpoint (``peftlab.serve.store.forms_of``). Workload: a closed loop keeping
``--batch`` requests in flight (a finished request is replaced at the next step), each a prompt of
``--prompt`` random tokens and exactly ``--new`` greedy new tokens; throughput = generated tokens / wall
time; latency = submit -> last token, per request. Scenarios: the base model; 1, 8, 100 and 1,000
adapters with uniform and Zipf(1) popularity; a mixed-method batch (LoRA + DoRA + IA3 + VeRA); a second one of the
methods served outside the linears' LoRA form (LoRA + MoLoRA + bottleneck + LLaMA-Adapter, saved to a temporary
folder and registered as a server's checkpoints) and each of those three alone. GPU slots
(``--max-gpu-adapters``) are fewer than 1,000, so that scenario swaps adapters CPU -> GPU (the 1,000
adapter names share ``--distinct`` weight sets in CPU memory; a swap copies a full adapter either way).
Also: adapter cold load disk -> GPU slot, the greedy agreement of batched vs alone (bf16 on GPU), and
HF PEFT ``generate(adapter_names=...)`` (the protocol of ``/work/shared/anchors/peft_serving_baseline.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# graph rows run again, right after them, with each of these StepContext flags flipped (row, flag, what the row says)
LANES = "row kernels by lanes of token tiles, requests by slot"  # static_row_lanes: off by default
ROUTED = "MoLoRA's and the bottleneck's tables one token a program"  # static_routed_lanes: on by default
FLAG_AB = [*((row, "static_row_lanes", LANES) for row in ("1 adapter, uniform", "100 adapters", "mixed methods:",
                                                           "mixed methods II")),
           *((row, "static_routed_lanes", ROUTED) for row in ("1 adapter, molora", "1 adapter, bottleneck",
                                                               "mixed methods II")),
           ("100 adapters", "static_shared_input", "LoRA of q / k / v and gate / up a layer at a time"),
           ("mixed methods:", "static_row_scales", "IA3 input scale and VeRA in torch"),
           ("mixed methods:", "static_vera_in_base", "VeRA's first product apart from the base GEMM"),
           ("mixed methods:", "static_shared_input", "LoRA of q / k / v and gate / up a layer at a time"),
           ("1 adapter, molora", "static_route_kernel", "MoLoRA's gates in torch between the row kernels"),
           ("1 adapter, molora", "static_shared_input", "MoLoRA's tables a layer at a time"),
           ("1 adapter, bottleneck", "static_sublayer_kernel", "the bottleneck's biases, activation and blend in torch")]
MIXED = ["lora0", "dora", "ia3", "vera"]  # the mixed-method batch: a LoRA and one adapter of each other method
# the second mixed batch: a LoRA and one adapter of each method served in tables outside the linears' LoRA form
INPUT_SIDE = ["lora0", "molora", "bottleneck", "llama_adapter"]
INPUT_SIDE_LABEL = "mixed methods II: LoRA + MoLoRA + bottleneck + LLaMA-Adapter"
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from results_io import write_readme  # noqa: E402
from train_step import SHAPES, environment  # noqa: E402

import torch  # noqa: E402

# the engine and workload, the side measurements and the table live beside this file; their names stay importable
# from here (serve_overhead.py and serve_profile.py use them as serve.<name>)
from serve_measures import agreement, cold_load, kernel_timing, peft_baseline  # noqa: E402
from serve_table import markdown_table  # noqa: E402
from serve_workload import (  # noqa: E402,F401
    _sync, build_engine, build_model, lora_config, make_adapter, method_configs, popularity, workload)


def run(args, doc: dict[str, Any], save) -> None:
    vocab = SHAPES[args.shape]["model"]["vocab_size"]
    if not args.no_peft:  # first: a run cut short by its time limit still has the comparison
        try:
            doc["peft"] = peft_baseline(args, vocab)
        except Exception as exc:  # recorded, not fatal: our numbers stand on their own
            doc["peft"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(doc["peft"]), flush=True)
        save(doc)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    engine, build_s = build_engine(args)
    n = args.requests
    workload(engine, [f"lora{i % 8}" for i in range(args.batch)], args, vocab, seed=0)  # warm-up: kernels, caches
    scenarios: list[dict[str, Any]] = []
    doc.update(scenarios=scenarios, adapter_build_s=round(build_s, 2))

    def scenario(label, names, **meta):
        res = workload(engine, names, args, vocab, seed=len(scenarios) + 1)
        scenarios.append({"scenario": label, **meta, **res})
        print(json.dumps(scenarios[-1]), flush=True)
        save(doc)  # a run cut short by its time limit still leaves what it measured

    scenario("base model", [None] * n, adapters=0, popularity="-")
    for count in args.adapters:  # uniform first, the mixed-method batch early: the headline numbers come first
        pool = [f"lora{i}" for i in range(count)]
        scenario(f"{count} adapter{'s' if count > 1 else ''}, uniform", popularity(pool, n, 0.0, count),
                 adapters=count, popularity="uniform")
        if count == 8:
            scenario("mixed methods: LoRA + DoRA + IA3 + VeRA", [MIXED[i % len(MIXED)] for i in range(n)], adapters=4,
                     popularity="uniform")
            for label, names in input_side_runs(n):
                scenario(label, names, adapters=len(set(names)), popularity="uniform")
    for count in [c for c in args.adapters if c >= 8]:
        pool = [f"lora{i}" for i in range(count)]
        scenario(f"{count} adapters, Zipf(1)", popularity(pool, n, 1.0, count), adapters=count, popularity="zipf1")
    if args.cuda_graphs:  # the headline scenarios again, decode steps replayed as CUDA graphs (serve/graphs.py)
        # the cold load before any graph row too: two H200 runs gave 50.8 and 44.6 ms after them (28-29 ms before
        # two more A/B rows were added ahead of it); this tells the bench order from the code
        doc["cold_load_before_graphs"] = cold_load(engine, args, prefix="early")
        print(json.dumps(doc["cold_load_before_graphs"]), flush=True)
        graph_scenarios(engine, args, vocab, n, scenario, doc)
        save(doc)
    doc["triton_error"] = engine.context.triton_error  # None: the Triton kernels ran throughout
    doc["cold_load"] = cold_load(engine, args)
    print(json.dumps(doc["cold_load"]), flush=True)
    doc["agreement"] = agreement(engine, args, vocab)
    print(json.dumps(doc["agreement"]), flush=True)
    save(doc)
    try:
        doc["kernels"] = kernel_timing(args)
    except Exception as exc:  # recorded: the scenarios above stand without it
        doc["kernels"] = [{"error": f"{type(exc).__name__}: {exc}"}]
    print(json.dumps(doc["kernels"]), flush=True)
    save(doc)
    engine.stop(drain=False)


def input_side_runs(n: int) -> list[tuple[str, list[str]]]:
    """The second mixed batch, then each of its non-LoRA methods alone (one adapter): what each table costs."""
    return [(INPUT_SIDE_LABEL, [INPUT_SIDE[i % len(INPUT_SIDE)] for i in range(n)]),
            *((f"1 adapter, {name}", [name] * n) for name in INPUT_SIDE[1:])]


def graph_scenarios(engine, args, vocab: int, n: int, scenario, doc: dict[str, Any]) -> None:
    """Base, 1 and 100 uniform adapters and the mixed-method batch on the same engine with CUDA graphs on."""
    from peftlab.serve.graphs import DecodeGraphs

    engine.graphs = DecodeGraphs(engine.model, engine.cache, engine.context, engine.layers)
    if args.static_triton is not None:
        engine.context.static_triton = args.static_triton == "on"
    workload(engine, [f"lora{i % 8}" for i in range(args.batch)], args, vocab, seed=0)  # warm-up: the captures
    runs = [("base model", [None] * n, 0), ("1 adapter, uniform", ["lora0"] * n, 1),
            ("100 adapters, uniform", popularity([f"lora{i}" for i in range(100)], n, 0.0, 100), 100),
            ("mixed methods: LoRA + DoRA + IA3 + VeRA", [MIXED[i % len(MIXED)] for i in range(n)], 4),
            *((label, names, len(set(names))) for label, names in input_side_runs(n))]
    warm: dict[str, Any] = {}
    triton_ab = any(layer.use_triton for layer in engine.layers.values()) and engine.context.triton_error is None
    for label, names, count in runs:
        if count > max(args.adapters):
            continue
        if count == 100:
            # the rows before (1,000 adapters) left other adapters in the GPU slots: one untimed pass of this row's
            # requests brings its adapters back (loads counted apart), so the row measures steady-state decoding
            res = workload(engine, names, args, vocab, seed=97)
            warm.update(hundred_warmup_s=res["wall_s"], hundred_warmup_loads=res["gpu_misses"])
        if label.startswith("mixed") or count == 1 and names[0] != "lora0":
            # its first DoRA / IA3 / VeRA (or MoLoRA, ...) adapters add tables to the layers, so the decode graphs are
            # captured again, once in a server's life: that one-off is timed here, apart from the steady-state row
            before, t0 = engine.graphs.captures, time.perf_counter()
            workload(engine, names[:args.batch], args, vocab, seed=99)
            key = "mixed" if label.startswith("mixed methods:") else names[0] if count == 1 else "input_side"
            warm.update({f"{key}_warmup_s": round(time.perf_counter() - t0, 3),
                         f"{key}_warmup_captures": engine.graphs.captures - before})
        scenario(f"{label}, CUDA graphs", names, adapters=count, popularity="uniform" if count else "-", graphs=True)
        if count == 100 and triton_ab:
            # the same row, right after it (before the mixed batch adds scale tables to every layer), with the other
            # form of the step's LoRA: the Triton row kernels if the default is gather + batched products, or back
            default = engine.context.static_triton
            engine.context.static_triton = not default
            engine.graphs.invalidate()  # captured again on that path, in an untimed batch first
            workload(engine, names[:args.batch], args, vocab, seed=98)
            scenario(f"{label}, CUDA graphs, LoRA step by {'Triton row kernels' if not default else 'gather + bmm'}",
                     names, adapters=count, popularity="uniform", graphs=True)
            engine.context.static_triton = default
            engine.graphs.invalidate()
        for row, flag, change in FLAG_AB if triton_ab and engine.context.static_triton else ():
            if not label.startswith(row):
                continue
            # the same row, right after it, with one of the step's kernel choices flipped: what it changes, side by side
            default = getattr(engine.context, flag)
            setattr(engine.context, flag, not default)
            engine.graphs.invalidate()
            workload(engine, names[:args.batch], args, vocab, seed=96)
            scenario(f"{label}, CUDA graphs, {change}", names, adapters=count, popularity="uniform", graphs=True)
            setattr(engine.context, flag, default)
            engine.graphs.invalidate()
    doc["graphs"] = {"captures": engine.graphs.captures, "graph_steps": engine.graphs.steps_run,
                     "shapes": sorted([b, w, sorted(p)] for b, w, p in engine.graphs.steps),
                     "error": engine.graphs.error,
                     "static_triton": engine.context.static_triton, **warm}
    engine.graphs = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests per scenario")
    p.add_argument("--adapters", default="1,8,100,1000", help="adapter counts of the LoRA scenarios")
    p.add_argument("--distinct", type=int, default=32, help="distinct weight sets behind the adapter names")
    p.add_argument("--max-gpu-adapters", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--cold-repeats", type=int, default=5)
    p.add_argument("--agree-new", type=int, default=32)
    p.add_argument("--agree-requests", type=int, default=20, help="requests of the batched-vs-alone check (<= 20)")
    p.add_argument("--kernel-iters", type=int, default=20)
    p.add_argument("--peft-adapters", type=int, default=8)
    p.add_argument("--peft-repeats", type=int, default=2)
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also run base, 1 and 100 adapters and the mixed batch with decode steps as CUDA graphs")
    p.add_argument("--static-triton", choices=["on", "off"], default=None,
                   help="the graph rows' LoRA step: Triton row kernels (on) or gather + bmm (off); default: the "
                        "library's (StepContext.static_triton); the A/B row runs the other")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, small everything (a test runs it)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/serve/serve_<shape>.json)")
    p.add_argument("--table", type=Path, help="print the markdown table of a results JSON (no run)")
    p.add_argument("--readme", type=Path, help="with --table: put the table into this file between markers")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny", args.device or "cpu", "float32"
        args.batch, args.prompt, args.new, args.requests = 4, 8, 3, 8
        args.adapters, args.distinct, args.max_gpu_adapters = "1,8,20", 4, 8
        args.cold_repeats, args.agree_new, args.peft_adapters, args.peft_repeats = 1, 3, 2, 1
        args.agree_requests, args.kernel_iters = 6, 2
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.torch_dtype = getattr(torch, args.dtype)
    args.adapters = [int(a) for a in str(args.adapters).split(",") if a]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        doc = json.loads(args.table.read_text())
        table = markdown_table(doc)
        print(table)
        if args.readme:
            write_readme(args.readme, args.table, table)
        return
    out = args.out or ROOT / "bench" / "results" / "serve" / f"serve_{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(document: dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1) + "\n")
        tmp.replace(out)

    doc: dict[str, Any] = {"environment": environment(args.device),
                           "args": {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()}}
    run(args, doc, save)
    save(doc)
    print(markdown_table(doc))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
