"""OFT's block rotation alone, forward + backward: the batched-matmul node on strided views
(``peftlab.ops.orthogonal.block_rotate``) against the einsum form (``block_rotate_reference``, what
PEFT runs), in bf16 and fp32, at the 1B Llama shape's two input widths (2048 and 8192), B4 x T1024.

    python bench/rotation.py --out bench/results/rotation_h200.json      # a GPU machine
    python bench/rotation.py --device cpu --tokens 256 --iters 2          # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from results_io import environment, write_atomic
from peftlab.ops.orthogonal import block_rotate, block_rotate_reference

IMPLS = {"peftlab": block_rotate, "einsum": block_rotate_reference}


def time_one(fn, x, blocks, iters: int, device: str) -> float:
    """Median ms of forward + backward (gradients for both the input and the blocks)."""
    grad = torch.randn_like(x)
    times = []
    for i in range(iters + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(x, blocks)
        torch.autograd.grad(out, (x, blocks), grad)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for width in (2048, 8192):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(args.tokens, width, device=args.device, dtype=dtype, requires_grad=True)
            blocks = (torch.randn(width // args.block, args.block, args.block, device=args.device, dtype=dtype) * 0.1
                      ).requires_grad_()
            for name, fn in IMPLS.items():
                ms = time_one(fn, x, blocks, args.iters, args.device)
                rows.append(dict(width=width, dtype=str(dtype).split(".")[-1], impl=name, ms=round(ms, 4)))
                print(f"width {width:5d} {rows[-1]['dtype']:8s} {name:8s} {ms:8.3f} ms", flush=True)
    result = {"environment": environment(args.device), "tokens": args.tokens, "block": args.block, "rows": rows}
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
