"""Layers that read the same input (q / k / v, gate / up) in one fixed-shape step: each keeps its own base GEMM and
tables, and their LoRA terms run in one shrink launch and one expand launch (``kernels.row_lowrank_group``) instead
of one pair per layer: six launches fewer per Llama decoder layer (904 kernels per adapter decode step of the 1B
shape instead of 1,000). A graph replay costs ~1.4 us per kernel beyond the kernels' own time there, and the grouped row
kernels took 321 + 245 us of GPU time per 100-adapter step against 484 + 355 us one layer at a time
(bench/results/serve/profile_1b_h200_2026-12-03l.json vs profile_1b_h200.json); the same-run throughput A/B rows
(``StepContext.static_shared_input`` off) moved -9% to +12%, within the runs' spread. Their routed (MoLoRA) terms
are grouped the same way (``routed.routed_outputs``: one shrink and one route-expand launch for q / k / v's tables,
one for gate / up's)."""
from __future__ import annotations

import torch
from torch import nn

from peftlab.serve.layers import BatchedLinear
from peftlab.serve.routed import routed_outputs


def shared_input(x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``; for BatchedLinear layers of one model in a fixed-shape step, their LoRA terms (where
    they run in the row kernels) and their routed (MoLoRA) terms in grouped launches. Eager steps and other modules
    are plain calls."""
    layers = [m for m in modules if isinstance(m, BatchedLinear)]
    ctx = layers[0].context if layers else None
    if (ctx is None or ctx.static_rows is None or not ctx.static_shared_input or len(layers) != len(modules)
            or any(m.context is not ctx for m in layers)):
        return [m(x) for m in modules]
    joined = [m for m in layers if m._kernels_ready()]
    done = _joined_lowrank(x, joined) if len(joined) >= 2 else {}
    return routed_outputs(x, layers, [done[id(m)] if id(m) in done else m._forward(x) for m in layers])


def _joined_lowrank(x: torch.Tensor, joined: list[BatchedLinear]) -> dict[int, torch.Tensor]:
    """id(layer) -> its output without routed terms, the LoRA terms of ``joined`` in grouped launches; empty when the
    kernels failed (the context says why: every layer runs its torch form from now on)."""
    from peftlab.serve import kernels

    ctx = joined[0].context
    rows = ctx.static_rows
    plans = [m._kernel_plan(rows) for m in joined]
    xf = x.reshape(-1, x.shape[-1])
    xc = xf.contiguous()

    def run() -> list[torch.Tensor]:
        parts = [m._kernel_base(xc, rows, plan) for m, plan in zip(joined, plans)]
        lowrank = [m._kernel_lowrank(y, plan) for m, plan, (y, _) in zip(joined, plans, parts)]
        for start in range(0, len(lowrank), kernels.MAX_GROUP):
            kernels.row_lowrank_group(xc, lowrank[start:start + kernels.MAX_GROUP], rows, skip_row=ctx.capacity,
                                      lanes=ctx.static_row_lanes)
        for m, plan, (y, z) in zip(joined, plans, parts):
            m._kernel_vera_pair(z, rows, plan, y)
        return [y for y, _ in parts]

    ys = joined[0]._triton_value(run)
    if ys is None:
        return {}
    done = {}
    for m, plan, y in zip(joined, plans, ys):
        m._kernel_vera_pairs(xf, rows, plan, y)
        done[id(m)] = y.reshape(*x.shape[:-1], m.out_features)
    return done
