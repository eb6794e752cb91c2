"""CPU proxy for the dense-update fast path (FourierFT, SHiRA, WaveFT: methods/_dense.py; HiRA, MiSS "bat", FRoD,
Super-Tuning): one training step (forward + backward) with the fast path forced on (PEFTLAB_FAST=1, one GEMM on
W0 + dW) against the reference (PEFTLAB_FAST=0, W0 x + dW x), alternated, best of ROUNDS rounds of STEPS steps each.
A 4-layer Llama with SmolLM2-135M's widths, fp32, B4 x 64, every linear adapted. Not a GPU number.

    python bench/dense_update_cpu.py --out bench/results/dense_update_cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_cpu_rows  # noqa: E402

SHAPE = dict(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
             num_key_value_heads=3)


def step_ms(variant: str, fast: str, batch: int, seq: int, steps: int, rounds: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import peftlab

    os.environ["PEFTLAB_FAST"] = fast
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE))
    peftlab.attach(model, peftlab.variants()[variant]("all-linear", 8))
    model.train()
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq))
    for _ in range(2):  # warm-up
        model(ids, labels=ids).loss.backward()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            model(ids, labels=ids).loss.backward()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fourierft,shira,waveft")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        runs = {"0": [], "1": []}
        for fast in ("0", "1", "0", "1"):  # alternated, so drift on a shared machine hits both alike
            runs[fast].append(step_ms(variant, fast, args.batch, args.seq, args.steps, args.rounds))
        ref, fused = min(runs["0"]), min(runs["1"])
        rows.append({"variant": variant, "reference_ms": ref, "fused_ms": fused, "ratio": fused / ref, "runs": runs})
        print(f"{variant:10s} reference {ref:.0f} ms  fused {fused:.0f} ms  ratio {fused / ref:.2f}")
    write_cpu_rows(args, SHAPE, rows)


if __name__ == "__main__":
    main()
