"""How much of a small update survives the dense-update node's bf16 sum (``fast.dense_update``: one GEMM on
W0 + ΔW in the activations' dtype, the GPU default of FourierFT, SHiRA, WaveFT, C3A, HiRA, MiSS "bat", FRoD, GLoRA
and Super-Tuning's sparse part), against ΔW x as its own bf16 product (the reference path's form, two GEMMs).

For a bf16 W0 (N(0, 0.02), 1024 x 1024) and updates of relative size s = |ΔW| / |W0|, additive (ΔW ~ N(0, 0.02 s))
or relative (ΔW = W0 ⊙ M, M ~ N(0, s): HiRA's form), it reports, at the output y = x W^T for 256 random tokens,
the share of Δy = x ΔW^T that each form reproduces (<ŷ - y0, Δy> / <Δy, Δy>, 1 = all of it) and the relative
error of its Δy, against float64 (ŷ in bf16 for both forms, as the layers' outputs are). The sum rounds ΔW onto
W0's bf16 grid (2^-8 relative), but the bf16 output rounds y0 + Δy onto the output's grid just the same, so on a
bf16 model both forms lose an update much smaller than the weights from the forward (the gradient of ΔW, dy^T x, is
unaffected; a model merged in bf16 rounds like the one-GEMM form).

    python bench/dense_rounding.py --out bench/results/dense_rounding_cpu_2026-12-06.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_cpu_rows  # noqa: E402

SIZES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def share_and_error(delta_hat: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    share = (delta_hat * delta).sum() / (delta * delta).sum()
    return round(share.item(), 4), round(((delta_hat - delta).norm() / delta.norm()).item(), 4)


def row(form: str, s: float, g: torch.Generator) -> dict:
    w0 = (torch.randn(1024, 1024, generator=g) * 0.02).bfloat16()
    noise = torch.randn(1024, 1024, generator=g, dtype=torch.float64)
    dw = w0.double() * noise * s if form == "relative" else noise * 0.02 * s
    x = torch.randn(256, 1024, generator=g).bfloat16()
    y0, dy = x.double() @ w0.double().t(), x.double() @ dw.t()
    summed = (x @ (w0 + dw.bfloat16()).t()).double() - y0  # the dense-update node: one GEMM on the bf16 sum
    apart = ((x @ w0.t()) + (x @ dw.bfloat16().t())).double() - y0  # ΔW x as its own bf16 product, added in bf16
    (share_sum, err_sum), (share_apart, err_apart) = share_and_error(summed, dy), share_and_error(apart, dy)
    print(f"{form:9s} s={s:<7g} one GEMM on W0 + dW: share {share_sum:6.3f} error {err_sum:6.3f}   "
          f"dW x apart: share {share_apart:6.3f} error {err_apart:6.3f}")
    return {"form": form, "relative_size": s, "summed_share": share_sum, "summed_error": err_sum,
            "apart_share": share_apart, "apart_error": err_apart}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("dense_rounding_cpu.json"))
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = [row(form, s, g) for form in ("additive", "relative") for s in SIZES]
    write_cpu_rows(args, {"w0": [1024, 1024], "w0_std": 0.02, "tokens": 256, "dtype": "bfloat16"}, rows)


if __name__ == "__main__":
    main()
