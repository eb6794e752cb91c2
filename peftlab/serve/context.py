"""What the engine tells every serving layer before a forward (``StepContext``): the per-token table rows and the
tokens' segments by slot for an eager step, or, for a fixed-shape (graph-replayed) decode step, its row buffer, the
adapter paths its tokens use and which kernels run them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from peftlab.serve.batched import Segments, group_by_slot, table_rows

log = logging.getLogger("peftlab.serve")


@dataclass
class StepContext:
    """What the engine sets before each forward: per-token table rows (device), the tokens' segments by slot,
    and the slots present. Shared by every BatchedLinear of a model (same ``capacity``)."""

    capacity: int
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    seg: Segments = field(default_factory=lambda: group_by_slot([]))
    present: frozenset = frozenset()
    triton_error: str | None = None  # set when the Triton kernel failed to build: every layer uses torch from then on
    use_triton: bool = False  # the Triton kernels may run on this device (install's use_triton; the tables read it)
    # set while a fixed-shape decode step runs (serve/graphs.py): its (B,) table rows, a buffer a CUDA graph replays
    static_rows: torch.Tensor | None = None
    # with static_rows: the adapter paths the step's tokens use, a subset of PATHS (empty: base-model tokens only, no
    # adapter work; default: all). graphs.py sets it per step, so a step of LoRA tokens skips VeRA's products and the
    # scale tables even while adapters that use them sit in other slots (a resident VeRA adapter cost every captured
    # step its products: H200 profile, bench/results/serve/profile_1b_h200.json)
    # (and "sublayer": the sub-layer tables of serve/sublayer.py, bottleneck adapters; "prompt_attention": the
    # prompt-attention tables of serve/prompt_attention.py, LLaMA-Adapter)
    # (and "routed": the routed tables of serve/routed.py on the linears, MoLoRA)
    static_paths: frozenset = frozenset(("lora", "out", "in", "vera", "sublayer", "prompt_attention", "routed"))
    # the fixed-shape step's LoRA through the Triton row kernels (kernels.row_lowrank: a shrink and an expand that
    # read each token's factors in place; layers without use_triton ignore it) instead of a gather and two batched
    # products: on the H200, 100 adapters under graphs at 4,702 / 4,587 tokens/s against 4,037 / 3,685 (two runs,
    # each side by side, bench/README.md)
    static_triton: bool = True
    # with static_triton: IA3's input scale and VeRA on one shared projection pair in row kernels too (kernels.
    # row_scale, row_scaled_matmul: three launches fewer per layer for the mixed batch), else in torch
    static_row_scales: bool = True
    # with static_row_scales: VeRA's first product on one shared projection pair computed in the base GEMM, through a
    # weight [W0; P_A] whose first rows W0 is (BatchedLinear.cat_weight; bases without bias only): a launch fewer per
    # adapted linear of a step with VeRA tokens
    static_vera_in_base: bool = True
    # with static_triton: the LoRA terms of layers that read one input (q / k / v, gate / up) in one shrink and one
    # expand launch (serve/shared.py), else a launch pair per layer
    static_shared_input: bool = True
    # with static_triton: MoLoRA's gates in the launch of its expand (serve/route_kernel.py, the tables of layers
    # that read one input grouped), else in torch between the shrink and the LoRA expand (about fifteen small kernels
    # per adapted linear, one table at a time)
    static_route_kernel: bool = True
    # with static_triton: a bottleneck table's biases, activation, up projection and blend in one launch after the
    # shrink (serve/sublayer_kernel.py; one activation of ACTIVATIONS in the step), else the expand and torch
    static_sublayer_kernel: bool = True
    # with static_triton: the LoRA tables' row shrink and expand by lanes of 16-token tiles, a tile's tokens of one row
    # reading its factors once (serve/lane_kernels.py), and the engine's steps ordered by slot so that they share
    # tiles; off: on an H100 it cost the LoRA rows 5-11% against the one-token programs (thirty-fifth session,
    # bench/README.md)
    static_row_lanes: bool = False
    # the same for MoLoRA's and the bottleneck's tables (their shrink, MoLoRA's route-expand and the bottleneck's
    # expand, serve/lane_expands.py; the steps ordered by slot too): on, as in the same A/B it sped MoLoRA's row up
    # 35%, the bottleneck's 10%
    static_routed_lanes: bool = True
    slot_changes: int = 0  # counts slot writes and clears in any layer: graphs.py re-reads the layers only then

    def set(self, slots: list[int], device: torch.device | str) -> None:
        self.rows = table_rows(slots, self.capacity, device)
        self.seg = group_by_slot(slots, device)
        self.present = frozenset(self.seg.slots_cpu)


def run_triton(ctx: StepContext, kernels, allowed: bool) -> bool:
    """Runs ``kernels()`` (Triton launches adding adapter terms into a layer's output) and says whether they ran:
    False when the kernels are off (``allowed``: a layer's ``use_triton``, a table's ``ctx.use_triton``) or failed
    before (``ctx.triton_error``) or now (recorded there: every layer uses torch from then on; the output is untouched
    and the caller runs torch)."""
    if not allowed or ctx.triton_error is not None:
        return False
    try:
        kernels()
        return True
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # the kernel did not build or launch: say so, go on
        ctx.triton_error = f"{type(exc).__name__}: {exc}"
        log.error("Triton kernel failed (%s); serving continues on the torch path", ctx.triton_error)
        return False


def triton_value(ctx: StepContext, kernels, allowed: bool):
    """``kernels()``'s result when its Triton launches ran (``run_triton``), else None (off or failed)."""
    result: list = []
    return result[0] if run_triton(ctx, lambda: result.append(kernels()), allowed) else None


# the adapter paths of a layer, each with the set of slots that use it (BatchedLinear.<path>_slots,
# ModuleTable.<path>_slots; a table without a path's attribute has no slot on it)
PATHS = tuple(StepContext.static_paths)


class KernelPlan(NamedTuple):
    """How one layer's fixed-shape step runs in the row kernels (``BatchedLinear._kernel_plan``)."""

    scale_in: bool  # IA3's input scale
    scale_out: bool  # IA3 / DoRA's output scale
    vera: bool  # VeRA on the shared projections
    fold: bool  # the output scale applied inside the LoRA expand kernel (bases without bias)
    one_pair: bool  # VeRA on one shared projection pair, its vectors in row_scaled_matmul
    in_base: bool  # with one_pair: P_A x out of the base GEMM through [W0; P_A]
    torch_in: bool  # the input scale by a gathered table in torch (row-scale kernels off)
    scales: dict  # the tokens' gathered rows of the scale tables, where a torch path needs them
