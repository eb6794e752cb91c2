"""Host work of an eager QLoRA training step on the CPU: a Llama with the 8B shape's 32 layers but hidden size 64, its
linears in 4-bit NF4 with double quantization (bitsandbytes' CPU backend), LoRA r8 on all linears, peftlab's block
checkpointing and bf16 autocast, as the GPU's 8B QLoRA B1 row runs (bench/memory.py). On the H200 that step is
host-bound (tenth session, bench/README.md: ~78-107 ms of kernels in a 338-623 ms step), so the operator count per
step is what a change to the 4-bit path should lower; this script counts the operators of one step (torch.profiler)
and times steps.

    PYTHONPATH=DIR_WITH_BITSANDBYTES python bench/qlora_overhead.py --out bench/results/qlora_overhead_cpu.json
    python bench/qlora_overhead.py --compile inductor [--out ...]   # compiled layers, as the GPU rows run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from results_io import environment, write_atomic

COUNTED = ("aten::to", "aten::_to_copy", "aten::copy_", "aten::mm", "aten::mul", "aten::mul_", "aten::addmm_",
           "bitsandbytes::dequantize_4bit", "bitsandbytes::dequantize_blockwise")


def build(layers: int):
    import peftlab
    from peftlab.quant.bnb import prepare_for_kbit_training, quantize_model
    from proxy import proxy_llama

    model = proxy_llama(layers, intermediate=256, dtype=torch.bfloat16)
    quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16, device=torch.device("cpu"))
    model = prepare_for_kbit_training(model, torch.bfloat16)
    peftlab.attach(model, peftlab.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", metavar="BACKEND", help="compile each decoder layer (inductor), as the GPU rows do; "
                   "PEFTLAB_TORCH_DEQUANT=0 keeps bitsandbytes' dequantization inside the compiled layers")
    p.add_argument("--out")
    cli = p.parse_args()
    os.environ.setdefault("PEFTLAB_FAST", "1")  # the fused nodes a GPU run takes, here on the CPU
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile

    from peftlab.train.activations import checkpointing

    model = build(cli.layers)
    if cli.compile:
        from peftlab.train.packing import compile_model

        compile_model(model, cli.compile, "layers")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(3, 120, (1, 16), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with checkpointing(model, "on"):
        for _ in range(3):
            step()
        times = []
        for _ in range(cli.steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = prof.key_averages()
    counts = {e.key: e.count for e in events if e.key in COUNTED}
    record = {"benchmark": "qlora_overhead", "environment": environment("cpu"), "layers": cli.layers,
              "adapted_linears": 7 * cli.layers,
              "compile": cli.compile, "torch_dequant": os.environ.get("PEFTLAB_TORCH_DEQUANT", "1") != "0",
              "ckpt_reentrant": os.environ.get("PEFTLAB_CKPT_REENTRANT", "1") != "0",
              "step_ms_median": round(statistics.median(times), 2),
              "operators_per_step": sum(e.count for e in events if e.key.startswith(("aten::", "bitsandbytes::"))),
              "counts": counts}
    print(json.dumps(record, indent=1))
    if cli.out:
        write_atomic(Path(cli.out), json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
