"""The scaled SwiGLU node's backward kernel (peftlab/ops/scaled_swiglu.py) under launch choices (CONFIG: tiles,
warps, programs, column sums reduced at each step or once), beside the floor: the plain SwiGLU backward that
inductor makes for the frozen base (one pointwise kernel, same reads and writes, no column sums). One GPU, CUDA
events, median of ``--iters`` calls after warm-up.

    python bench/swiglu_bwd.py --out bench/results/swiglu_bwd_h100.json      # 1B shape: 4096 tokens x 8192
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftlab.ops import scaled_swiglu as ss  # noqa: E402


def timed(fn, iters: int) -> float:
    """Median microseconds of ``fn()`` over ``iters`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(statistics.median(times), 1)


@torch.compile
def plain_backward(g: torch.Tensor, u: torch.Tensor, h: torch.Tensor):
    """The frozen base's SwiGLU backward, as inductor fuses it: d gate, d up in one pointwise kernel."""
    gf, uf, hf = g.float(), u.float(), h.float()
    sig = torch.sigmoid(gf)
    return (hf * uf * sig * (1 + gf * (1 - sig))).to(g.dtype), (hf * gf * sig).to(u.dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=120, help="no new launch choice after this many seconds")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    gate, up, grad = (torch.randn(args.tokens, args.cols, device="cuda", generator=g).bfloat16() for _ in range(3))
    s, a, b = (1 + 0.1 * torch.randn(args.cols, device="cuda", generator=g) for _ in range(3))
    want = ss.scaled_swiglu_backward_reference(gate, up, grad, s, a, b)
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens, "cols": args.cols,
           "default": dict(ss.CONFIG), "floor_plain_swiglu_bwd_us": timed(lambda: plain_backward(gate, up, grad),
                                                                          args.iters), "rows": []}
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}), flush=True)
    default = dict(ss.CONFIG)
    tiles = [(16, 128), (32, 128), (16, 256), (8, 512), (64, 64)]
    t0 = time.perf_counter()
    for each, (bt, bc), warps, programs in itertools.product((True, False), tiles, (4, 8), (2048, 8192)):
        if time.perf_counter() - t0 > args.budget_s:
            doc["stopped_after_s"] = args.budget_s
            break
        ss.CONFIG.update(BLOCK_T=bt, BLOCK_C=bc, num_warps=warps, programs=programs, EACH=each)
        row = dict(ss.CONFIG)
        try:
            got = ss.scaled_swiglu_backward(gate, up, grad, s, a, b)
            row["max_err_dgate"] = float((got[0].float() - want[0].float()).abs().max())
            row["max_rel_err_sums"] = max(float(((x - y).abs().max() / y.abs().max())) for x, y in
                                          zip(got[2:], want[2:]))
            row["all_vectors_us"] = timed(lambda: ss.scaled_swiglu_backward(gate, up, grad, s, a, b), args.iters)
            row["down_only_us"] = timed(lambda: ss.scaled_swiglu_backward(gate, up, grad, s), args.iters)
        except Exception as exc:  # a launch choice that does not build (registers, shared memory): recorded
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    ss.CONFIG.update(default)
    ok = [r for r in doc["rows"] if "error" not in r]
    doc["best"] = min(ok, key=lambda r: r["all_vectors_us"]) if ok else None
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("best:", json.dumps(doc["best"]))


if __name__ == "__main__":
    main()
