"""Slot tables on whole modules of the decoder layers, beside the linears' (``layers.BatchedLinear``): the sub-layer
tables of bottleneck adapters (``sublayer.py``) and the prompt-attention tables of LLaMA-Adapter
(``prompt_attention.py``). A table is kept as a plain attribute of its module (not a submodule: the model's
``named_modules`` and state are unchanged), by its fixed-shape path, and the serving forward (``forward._decoder``)
passes the module's outputs through it (``table_output``)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from peftlab.serve.batched import PackedRows, Segments
from peftlab.serve.context import StepContext, triton_value

TABLES = "serve_tables"  # module.__dict__[TABLES]: path -> the module's table of that path


class ModuleTable:
    """``capacity`` adapter slots (+ the identity row ``capacity``, read by base-model tokens in the fixed-shape step)
    on one module, for the fixed-shape path ``path`` (``StepContext.static_paths``). Its per-slot tables are views
    into ``packed`` (one gather reads every token's rows), allocated by the subclass on the first adapter that uses
    the module. A cleared row is all zeros (``_cleared`` restores any other identity value); ``slots`` (also
    ``<path>_slots``, which graphs.py reads) holds the slots with an adapter here, ``specs`` their settings."""

    path: str

    def __init__(self, name: str, context: StepContext, dtype: torch.dtype, device: torch.device):
        self.name, self.context, self.dtype, self.device = name, context, dtype, device
        self.capacity = context.capacity
        self.packed = PackedRows()
        self.slots: set[int] = set()
        setattr(self, f"{self.path}_slots", self.slots)  # the same set, under the name graphs.py reads
        self.specs: dict[int, tuple] = {}

    def zeros(self, *shape: int) -> torch.Tensor:
        """A zero table of every row (slots + identity), each row of ``shape``."""
        return torch.zeros(self.capacity + 1, *shape, dtype=self.dtype, device=self.device)

    def clear_slot(self, slot: int) -> None:
        self.context.slot_changes += 1
        if slot in self.slots:
            self.packed.data[slot].zero_()  # every table's row: the fixed-shape step reads it for any slot
            self._cleared(slot)
            self.specs.pop(slot)
            self.slots.discard(slot)

    def _cleared(self, slot: int) -> None:
        """Restore identity values other than zero in ``slot``'s row."""

    def static_signature(self) -> tuple:
        """What a captured fixed-shape step depends on (see ``BatchedLinear.static_signature``)."""
        return id(self.packed.data), bool(self.slots)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y``, the module's output, with each token's own slot's adapter here applied (``x``: what else the
        adapter reads); ``y`` itself where no token of the step has one."""
        ctx = self.context
        if ctx.static_rows is not None:
            return self._static(x, y, ctx.static_rows) if self.runs_static() else y
        return y if ctx.present.isdisjoint(self.slots) else self._eager(x, y, ctx.seg)

    def runs_static(self) -> bool:
        """Whether the fixed-shape step now running (``static_rows`` set) runs this table: its path is in the step's
        paths and it holds an adapter."""
        return self.path in self.context.static_paths and bool(self.slots)

    def row_kernels_allowed(self) -> bool:
        """Whether the fixed-shape step may run this table's Triton row kernels (the device's ``use_triton`` and
        ``static_triton``; a failure before turns them off, ``run_triton``)."""
        ctx = self.context
        return ctx.use_triton and ctx.static_triton

    def slot_tokens(self, seg: Segments) -> Iterator[tuple[int, torch.Tensor]]:
        """(slot, its token rows) for each slot of the step that has an adapter here (an eager step)."""
        for g, slot in enumerate(seg.slots_cpu):
            if slot in self.slots:
                yield slot, seg.order[seg.starts_cpu[g]:seg.starts_cpu[g + 1]]

    def _eager(self, x: torch.Tensor, y: torch.Tensor, seg: Segments) -> torch.Tensor:
        raise NotImplementedError

    def _row_kernel_value(self, kernels) -> torch.Tensor | None:
        """``kernels()``'s result when the fixed-shape step's Triton row kernels may run here (the device's
        ``use_triton`` and ``static_triton``) and ran, else None: the caller runs its torch maths."""
        return triton_value(self.context, kernels, self.row_kernels_allowed())

    def _static(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def attach_table(module: nn.Module, table: ModuleTable) -> None:
    module.__dict__.setdefault(TABLES, {})[table.path] = table


def table_output(module: nn.Module, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, an output of ``module``, through its table of ``path`` (if it has one)."""
    table = module.__dict__.get(TABLES, {}).get(path)
    return y if table is None else table(x, y)


def tables_of(decoder_layers: nn.ModuleList) -> list[ModuleTable]:
    """Every table attached to a module of these decoder layers."""
    return [t for layer in decoder_layers for m in layer.modules() for t in m.__dict__.get(TABLES, {}).values()]
