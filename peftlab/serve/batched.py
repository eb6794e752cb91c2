"""Batched adapter maths over a per-token adapter index (slot; -1 = base model).

Pure functions over slot tensors: every adapter in a GPU slot ``s`` owns row ``s`` of each table, and
each table has one extra identity row at the end, so that a gather with slot -1 (the base model)
reads identity values (ones for scales, zeros for low-rank factors) without a branch.

    LoRA / DoRA     y += B[s] (A[s] x)                 A: (S+1, R, in), B: (S+1, out, R); mixed ranks
                                                        are zero-padded to R (s folded into B)
    DoRA, IA3 out   y = out_scale[s] ⊙ (W0 x) + ...    per-slot magnitude / activation scaling
    IA3 ff          x' = in_scale[s] ⊙ x
    VeRA            y += up_scale[s] ⊙ (P_B[p] (mid[s] ⊙ (P_A[p] x)))   p = the slot's shared projection

The low-rank products are grouped by slot (tokens sorted by slot into segments, one matmul per
segment): ``lowrank_torch`` is the plain-torch reference; ``lowrank_triton`` does the same in one
kernel launch per shrink and expand (``peftlab.serve.kernels``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peftlab.core.adapter import ServingForm


FUSED_MAX_TOKENS = 16  # per slot; above it the fused kernel would recompute too many rank activations


@dataclass(frozen=True)
class Segments:
    """Tokens grouped by slot: ``order[starts[g]:starts[g+1]]`` are the token rows of slot ``slots[g]``.

    Base-model tokens (slot -1) belong to no segment. The CPU lists drive the torch path and the
    kernel's grid; the device tensors are what the kernel reads.
    """

    order: torch.Tensor  # (n,) int64 token rows sorted by slot
    starts: torch.Tensor  # (G+1,) int32
    slots: torch.Tensor  # (G,) int32
    starts_cpu: tuple[int, ...]
    slots_cpu: tuple[int, ...]
    max_len: int

    @property
    def empty(self) -> bool:
        return not self.slots_cpu


def group_by_slot(token_slots: list[int] | torch.Tensor, device: torch.device | str = "cpu") -> Segments:
    """Segments of the tokens of each adapter slot, from the per-token slot index (computed once per step)."""
    slots_list = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else list(token_slots)
    rows: dict[int, list[int]] = {}
    for i, s in enumerate(slots_list):
        if s >= 0:
            rows.setdefault(s, []).append(i)
    order: list[int] = []
    starts = [0]
    for s in sorted(rows):
        order.extend(rows[s])
        starts.append(len(order))
    ordered_slots = tuple(sorted(rows))
    max_len = max((len(v) for v in rows.values()), default=0)
    return Segments(
        order=torch.tensor(order, dtype=torch.int64, device=device),
        starts=torch.tensor(starts, dtype=torch.int32, device=device),
        slots=torch.tensor(ordered_slots, dtype=torch.int32, device=device),
        starts_cpu=tuple(starts), slots_cpu=ordered_slots, max_len=max_len,
    )


def lowrank_torch(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, seg: Segments,
                  ranks: list[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] += up[s] @ (down[s] @ x[t])`` for every token t of slot s; ``x`` (T, in), down (S+1, R, in),
    up (S+1, out, R). ``ranks[s]`` (optional) cuts slot s to its own rank, skipping the zero padding."""
    if out is None:
        out = x.new_zeros(x.shape[0], up.shape[1])
    for g, slot in enumerate(seg.slots_cpu):
        idx = seg.order[seg.starts_cpu[g]:seg.starts_cpu[g + 1]]
        r = down.shape[1] if ranks is None else ranks[slot]
        if r == 0:
            continue
        z = F.linear(x.index_select(0, idx), down[slot, :r])
        out.index_add_(0, idx, F.linear(z, up[slot, :, :r]).to(out.dtype))
    return out


def lowrank_triton(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, seg: Segments,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as ``lowrank_torch`` (padded ranks included): one fused launch when every slot has at most
    ``FUSED_MAX_TOKENS`` tokens (decode), else one shrink and one expand launch."""
    from peftlab.serve.kernels import fused_lowrank, grouped_matmul

    if out is None:
        out = x.new_zeros(x.shape[0], up.shape[1])
    if seg.empty:
        return out
    if seg.max_len <= FUSED_MAX_TOKENS and down.shape[1] <= 128:
        fused_lowrank(x.contiguous(), down, up, out, seg)
        return out
    z = torch.empty(x.shape[0], down.shape[1], device=x.device, dtype=up.dtype)  # rows outside segments unread
    # shrink: long K (in), N = rank; expand: K = rank, long N (out)
    grouped_matmul(x.contiguous(), down, z, seg, accumulate=False, block_n=16, block_k=64)
    grouped_matmul(z, up, out, seg, accumulate=True, block_n=64, block_k=16)
    return out


def row_lowrank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
                skip_row: int = -1, out_scale: torch.Tensor | None = None, lanes: bool = False) -> torch.Tensor:
    """``out[t] = out_scale[rows[t]] ⊙ out[t] + up[rows[t]] @ (down[rows[t]] @ x[t])`` (no scaling without
    ``out_scale``) with the Triton row kernels (``kernels.row_lowrank``): the fixed-shape step's form, every token's
    table row read on the device; gathers and batched products in torch (``BatchedLinear._forward_static``) compute
    the same."""
    from peftlab.serve.kernels import row_lowrank as kernels

    kernels(x, down, up, rows, out, skip_row=skip_row, out_scale=out_scale, lanes=lanes)
    return out


def table_rows(token_slots: list[int], capacity: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-token row of the (capacity + 1)-row slot tables: the slot, or the identity row ``capacity`` for -1."""
    return torch.tensor([s if s >= 0 else capacity for s in token_slots], dtype=torch.int64, device=device)


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(T, n) per-token rows of a (S+1, n) slot table (``rows`` from ``table_rows``)."""
    return table.index_select(0, rows)


def scaled_lowrank_grouped(x: torch.Tensor, proj_down: torch.Tensor, proj_up: torch.Tensor, proj_of_slot: list[int],
                           mid: torch.Tensor, up_scale: torch.Tensor, seg: Segments,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """VeRA for the slots in ``seg``: ``out[t] += up_scale[s] ⊙ (P_B[p] (mid[s] ⊙ (P_A[p] x[t])))``, p = proj_of_slot[s].

    proj_down (P, R, in), proj_up (P, out, R), mid (S+1, R), up_scale (S+1, out); a slot with p < 0 is skipped.
    """
    if out is None:
        out = x.new_zeros(x.shape[0], proj_up.shape[1])
    for g, slot in enumerate(seg.slots_cpu):
        p = proj_of_slot[slot]
        if p < 0:
            continue
        idx = seg.order[seg.starts_cpu[g]:seg.starts_cpu[g + 1]]
        z = F.linear(x.index_select(0, idx), proj_down[p]) * mid[slot]
        out.index_add_(0, idx, (F.linear(z, proj_up[p]) * up_scale[slot]).to(out.dtype))
    return out


def folded_vera(form: ServingForm) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the LoRA equal to a VeRA form: up_scale ⊙ (P_B (mid ⊙ (P_A x))) = (up_scale P_B)(mid P_A) x."""
    wide = torch.promote_types(form.down.dtype, torch.float32)  # products in fp32 at least, one rounding
    down, up = form.down.to(wide), form.up.to(wide)
    if form.mid_scale is not None:
        down = form.mid_scale.to(wide)[:, None] * down
    if form.up_scale is not None:
        up = form.up_scale.to(wide)[:, None] * up
    return down.to(form.down.dtype), up.to(form.up.dtype)


class PackedRows:
    """Per-slot tables of one layer stored side by side in a single (rows, width) tensor, so that a fixed-shape step
    gathers every token's row of all of them with one ``index_select`` (a graph-replayed decode step is bound by its
    count of small kernels). Each table is a view ``(rows, *shape)`` into ``data``; adding or reshaping one packs
    anew into fresh storage (``data`` changes identity: a captured step must be captured again)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.spans: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (first column, shape of one row)
        self.views: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        return self.views.get(name)

    def set(self, name: str, table: torch.Tensor) -> None:
        """Make ``table`` (rows, ...) the content of ``name``, added or replacing the old one (any shape)."""
        parts = {n: v for n, v in self.views.items() if n != name}
        parts[name] = table
        self.data = torch.cat([v.reshape(v.shape[0], -1) for v in parts.values()], dim=1)
        self.spans, self.views, col = {}, {}, 0
        for n, v in parts.items():
            shape, width = tuple(v.shape[1:]), v[0].numel()
            self.spans[n] = (col, shape)
            self.views[n] = self.data[:, col:col + width].view(v.shape[0], *shape)
            col += width

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every table's rows ``rows`` (T, ...), from one gather of the packed storage."""
        if self.data is None:
            return {}
        g = self.data.index_select(0, rows)
        return {n: g[:, c:c + math.prod(s)].view(g.shape[0], *s) for n, (c, s) in self.spans.items()}


def restacked(old: torch.Tensor | None, parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(parts)``, written into ``old`` when the shapes agree."""
    new = torch.stack(parts)
    return old.copy_(new) if old is not None and old.shape == new.shape else new


def grown(table: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``table`` zero-padded along ``dim`` to ``size``."""
    shape = list(table.shape)
    shape[dim] = size
    new = table.new_zeros(shape)
    new.narrow(dim, 0, table.shape[dim]).copy_(table)
    return new


class PackedTable:
    """A slot table of a ``BatchedLinear`` kept as a view into one of its ``PackedRows`` (``group``): read as a
    tensor (None until first set), assigned to add or replace it."""

    def __init__(self, group: str):
        self.group = group

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.group).get(self.name)

    def __set__(self, obj, table: torch.Tensor) -> None:
        getattr(obj, self.group).set(self.name, table)
