"""Serving's per-step overhead on the CPU: the engine's decode throughput for the base model, one LoRA adapter and
the LoRA + DoRA + IA3 + VeRA mix, on a Llama with the 1B shape's 16 layers but hidden size 64, so that the
arithmetic is negligible and what is timed is the Python and operator work per layer and step.

On the H200 (bench/results/serve/serve_1b_h200.json) decode is bound by that same work: there one adapter ran at
0.53x the base model's throughput and the mix at 0.32x; this proxy gives about 0.55x and 0.36x, so changes to the
per-layer path can be tried here first. The torch path stands in for the Triton one (no GPU here).

    python bench/serve_overhead.py --out bench/results/serve/overhead_cpu.json
    python bench/serve_overhead.py --prefill --out bench/results/serve/prefill_overhead_cpu.json

``--prefill``: workloads of one new token per request (128-token prompts), so each is one prefill step of the whole
batch, with the prefills attended in one padded call (``forward._batched_prefills``) and one by one.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import serve
from results_io import environment, write_atomic
from train_step import SHAPES

SCENARIOS = {"base model": [None], "1 LoRA adapter": ["lora0"], "LoRA + DoRA + IA3 + VeRA": ["lora0", "dora", "ia3", "vera"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill", action="store_true", help="time prefill steps, padded call vs one by one")
    p.add_argument("--prompt", type=int, help="prompt tokens (default 8; with --prefill 128)")
    p.add_argument("--out")
    cli = p.parse_args()
    cli.prompt = cli.prompt or (128 if cli.prefill else 8)
    if cli.prefill:
        cli.new = 1
    from peftlab.serve import forward
    from peftlab.serve.engine import Engine, EngineConfig

    torch.set_num_threads(1)
    SHAPES["overhead"] = {"model": dict(SHAPES["tiny"]["model"], num_hidden_layers=16)}
    args = serve.parse_args(["--shape", "overhead", "--device", "cpu", "--dtype", "float32", "--batch", str(cli.batch),
                             "--prompt", str(cli.prompt), "--new", str(cli.new), "--requests", str(cli.batch),
                             "--r", "16"])
    model = serve.build_model("overhead", "cpu", torch.float32)
    engine = Engine(model, EngineConfig(max_batch=cli.batch, max_prefill_tokens=cli.batch * cli.prompt,
                                        max_queue=10**6, kv_tokens=cli.batch * (cli.prompt + cli.new) * 2,
                                        max_gpu_adapters=16, max_cpu_adapters=8, convert_rank=16))
    engine.store.add_loaded(serve.make_adapter(engine, "lora0", serve.lora_config(16), seed=1))
    for k, (name, config) in enumerate(serve.method_configs(16).items()):
        if name != "lora":
            engine.store.add_loaded(serve.make_adapter(engine, name, config, seed=200 + k))
    vocab = SHAPES["overhead"]["model"]["vocab_size"]
    serve.workload(engine, ["lora0"] * cli.batch, args, vocab, 0)  # warm-up
    modes = {"padded call": forward.PREFILL_PAD_MAX, "one by one": 0} if cli.prefill else {"": forward.PREFILL_PAD_MAX}
    rates: dict[str, list[float]] = {f"{label}{', ' + m if m else ''}": [] for label in SCENARIOS for m in modes}
    for k in range(cli.rounds):
        for label, pool in SCENARIOS.items():
            names = [pool[i % len(pool)] for i in range(cli.batch)]
            for mode, pad_max in modes.items():
                forward.PREFILL_PAD_MAX = pad_max
                rates[f"{label}{', ' + mode if mode else ''}"].append(
                    serve.workload(engine, names, args, vocab, k + 1)["tokens_per_s"])
    median = {label: statistics.median(v) for label, v in rates.items()}
    base = next(iter(rates))
    ratios = {label: round(median[label] / median[base], 3) for label in rates}
    print(json.dumps({"tokens_per_s_median": median, "vs_base": ratios}))
    if cli.out:
        write_atomic(Path(cli.out), json.dumps({"benchmark": "serve_overhead_cpu", "environment": environment("cpu"),
                                                "batch": cli.batch, "new_tokens": cli.new, "prompt": cli.prompt,
                                                "layers": 16,
                                                "tokens_per_s": rates, "tokens_per_s_median": median,
                                                "vs_base": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
