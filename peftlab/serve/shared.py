"""Layers that read the same input (q / k / v, gate / up) in one fixed-shape step: each keeps its own base GEMM and
tables, and their LoRA terms run in one shrink launch and one expand launch (``kernels.row_lowrank_group``) instead
of one pair per layer: six launches fewer per Llama decoder layer (904 kernels per adapter decode step of the 1B
shape instead of 1,000). A graph replay costs ~1.4 us per kernel beyond the kernels' own time there, and the grouped row
kernels took 321 + 245 us of GPU time per 100-adapter step against 484 + 355 us one layer at a time
(bench/results/serve/profile_1b_h200_2026-12-03l.json vs profile_1b_h200.json); the same-run throughput A/B rows
(``StepContext.static_shared_input`` off) moved -9% to +12%, within the runs' spread."""
from __future__ import annotations

import torch
from torch import nn

from peftlab.serve.layers import BatchedLinear


def shared_input(x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``; for BatchedLinear layers of one model in a fixed-shape step whose LoRA runs in the
    row kernels, their LoRA terms in grouped launches. Eager steps and other modules are plain calls."""
    layers = [m for m in modules if isinstance(m, BatchedLinear)]
    ctx = layers[0].context if layers else None
    if (ctx is None or ctx.static_rows is None or not ctx.static_shared_input or len(layers) != len(modules)
            or any(m.context is not ctx for m in layers)):
        return [m(x) for m in modules]
    joined = [m for m in layers if m._kernels_ready()]
    if len(joined) < 2:
        return [m(x) for m in modules]
    from peftlab.serve import kernels

    rows = ctx.static_rows
    plans = {id(m): m._kernel_plan(rows) for m in joined}
    xf = x.reshape(-1, x.shape[-1])
    xc = xf.contiguous()

    def run() -> dict[int, torch.Tensor]:
        parts = {id(m): m._kernel_base(xc, rows, plans[id(m)]) for m in joined}
        lowrank = [m._kernel_lowrank(parts[id(m)][0], plans[id(m)]) for m in joined]
        for start in range(0, len(lowrank), kernels.MAX_GROUP):
            kernels.row_lowrank_group(xc, lowrank[start:start + kernels.MAX_GROUP], rows, skip_row=ctx.capacity)
        for m in joined:
            y, z = parts[id(m)]
            m._kernel_vera(xc, z, rows, plans[id(m)], y, triton=True)
        return {key: y for key, (y, _) in parts.items()}

    ys = joined[0]._triton_value(run)
    if ys is None:  # the kernels failed (the context says why): every layer runs its torch form from now on
        return [m(x) for m in modules]
    out = []
    for m in modules:
        if id(m) not in ys:
            out.append(m(x))
            continue
        y = ys[id(m)]
        m._kernel_vera(xf, None, rows, plans[id(m)], y, triton=False)
        out.append(y.reshape(*x.shape[:-1], m.out_features))
    return out
