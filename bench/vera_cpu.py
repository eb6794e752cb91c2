"""CPU proxy for VeRA's fused node with its per-rank vector as the node's own input (``fast.scaled_lowrank``, the
eighteenth session) against the earlier form that folded it into A (``d[:, None] * A``, whose backward builds A's
full (rank, in) gradient only to reduce it to d's): the 1B shape's widths, few layers, VeRA r256 on every linear,
bf16, the fused path on. On the CPU a step is bound by its matrix products, so the difference is the product the new
form drops (rank x tokens x in per layer). Rounds alternate; medians reported. Not a GPU number.

    python bench/vera_cpu.py --out bench/results/vera_cpu.json
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import step_ms, wide_llama, wide_parser, wide_shape  # noqa: E402
from results_io import write_timed_rows  # noqa: E402


def folded_forward(layer, x, base):
    """The earlier VeraLayer.fused_forward: d and b folded into A and B before the fused LoRA node."""
    from peftlab.ops import fast

    a, b = layer._projections()
    a, b = layer.vera_lambda_d[:, None] * a.to(x.device), layer.vera_lambda_b[:, None] * b.to(x.device)
    return fast.lowrank(x, base, a, b, 1.0, layer.dropout)


def main() -> None:
    parser = wide_parser(__doc__, seq=512, rounds=4)
    args = parser.parse_args()
    os.environ["PEFTLAB_FAST"] = "1"
    import torch

    import peftlab
    from peftlab.methods.vera import VeraLayer

    shape = wide_shape(args.layers)
    model = wide_llama(shape)
    peftlab.attach(model, peftlab.VeraConfig(r=256, target_modules="all-linear"))
    ids = torch.randint(3, 512, (1, args.seq))
    forms = {"folded into A (before)": folded_forward, "per-rank vector in the node": VeraLayer.fused_forward}
    times: dict[str, list[float]] = {name: [] for name in forms}
    try:
        for _ in range(args.rounds):
            for name, form in forms.items():
                VeraLayer.fused_forward = form
                for step in range(args.steps + 1):  # the first step of a round warms up
                    ms = step_ms(model, ids)
                    if step:
                        times[name].append(ms)
    finally:
        VeraLayer.fused_forward = forms["per-rank vector in the node"]
    write_timed_rows(args, shape, times)


if __name__ == "__main__":
    main()
