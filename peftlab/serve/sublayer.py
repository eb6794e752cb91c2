"""Slot tables for adapters on whole sub-layers (``SublayerForm``: bottleneck adapters), one table per decoder
layer's attention and MLP, beside the linear layers' tables (``layers.BatchedLinear``).

The serving forward (``forward._decoder``) hands each table the sub-layer's input ``x`` and output ``y`` (the
attention after o_proj, the MLP after down_proj; ``sublayer_output``), and the table gives every token the output
of its own slot's adapter:

    y'[t] = keep[s] * y[t] + scaling[s] * (up[s] phi_s(down[s] src[t] + down_bias[s]) + up_bias[s])
    src[t] = x[t] if parallel[s] else y[t]                                          (s: token t's slot)

A slot without a sub-layer adapter here (and the identity row that base-model tokens read) holds zeros with
keep = 1, so its tokens get exactly ``y``; an eager step does not even compute them. Adapters of different
bottleneck widths are zero-padded to the widest: the padded units see ``phi(0)`` (not 0 for every phi), and the
padded columns of ``up`` are zero, so they add nothing. Eager steps apply each present slot's form to its tokens
(``SublayerForm.apply``, at the slot's own width); the fixed-shape step runs the same maths batched, with no host
work and no data-dependent shape: on CUDA the down and up products in the LoRA row kernels (``kernels.row_shrink``
/ ``row_expand``, each token's rows read in place), else by gathering every token's row of the tables (one
``index_select`` of the packed tables) into batched products (``bottleneck_mlp``).
"""
from __future__ import annotations

import torch
from torch import nn

from peftlab.core.serving_form import SublayerForm, activation_fn, bottleneck_mlp
from peftlab.serve.batched import PackedTable, Segments, grown
from peftlab.serve.context import StepContext
from peftlab.serve.loading import ServeError
from peftlab.serve.module_table import ModuleTable, attach_table, table_output

PATH = "sublayer"  # the fixed-shape step's adapter path (``StepContext.static_paths``)


class BatchedSublayer(ModuleTable):
    """``capacity`` adapter slots (+ the identity row) on one sub-layer of hidden size ``hidden``; allocated on the
    first adapter that uses it. ``specs``: slot -> (width, scaling, non_linearity, parallel, residual)."""

    path = PATH
    down, up = PackedTable("packed"), PackedTable("packed")  # (rows, R, H), (rows, H, R)
    down_bias, up_bias = PackedTable("packed"), PackedTable("packed")  # (rows, R), (rows, H)
    scaling, keep, parallel = PackedTable("packed"), PackedTable("packed"), PackedTable("packed")  # (rows, 1) each

    def __init__(self, name: str, hidden: int, context: StepContext, dtype: torch.dtype, device: torch.device):
        super().__init__(name, context, dtype, device)
        self.hidden = hidden
        self.act_names: list[str] = []  # the activations seen; act_index holds a slot's position in this list
        self.act_index: torch.Tensor | None = None  # (rows,) int64, allocated with the tables

    # -- slots ---------------------------------------------------------------------------------
    def _allocate(self, width: int) -> None:
        zeros = self.zeros
        self.down, self.up, self.down_bias, self.up_bias = zeros(width, self.hidden), zeros(self.hidden, width), \
            zeros(width), zeros(self.hidden)
        self.scaling, self.parallel, self.keep = zeros(1), zeros(1), zeros(1) + 1
        self.act_index = torch.zeros(self.capacity + 1, dtype=torch.int64, device=self.device)

    def set_slot(self, slot: int, form: SublayerForm | None) -> None:
        """Put an adapter's form into ``slot`` (None: the adapter does not touch this sub-layer)."""
        self.clear_slot(slot)
        if form is None:
            return
        width = form.rank
        if self.packed.data is None:
            self._allocate(width)
        elif width > self.down.shape[1]:
            self.down, self.up, self.down_bias = grown(self.down, 1, width), grown(self.up, 2, width), \
                grown(self.down_bias, 1, width)
        self.down[slot, :width].copy_(form.down, non_blocking=True)
        self.down_bias[slot, :width].copy_(form.down_bias, non_blocking=True)
        self.up[slot, :, :width].copy_(form.up, non_blocking=True)
        self.up_bias[slot].copy_(form.up_bias, non_blocking=True)
        self.scaling[slot] = form.scaling
        self.keep[slot] = float(form.residual)
        self.parallel[slot] = float(form.parallel)
        if form.non_linearity not in self.act_names:
            self.act_names.append(form.non_linearity)
        self.act_index[slot] = self.act_names.index(form.non_linearity)
        self.specs[slot] = (width, form.scaling, form.non_linearity, form.parallel, form.residual)
        self.slots.add(slot)

    def _cleared(self, slot: int) -> None:
        self.keep[slot] = 1

    def _activations(self) -> tuple[str, ...]:
        return tuple(sorted({self.specs[s][2] for s in self.slots}))

    def _sources(self) -> tuple[bool, ...]:
        """The adapters' ``parallel`` settings here (each reads x if parallel, else y)."""
        return tuple(sorted({self.specs[s][3] for s in self.slots}))

    def static_signature(self) -> tuple:
        return *super().static_signature(), self._activations(), self._sources()

    # -- forward -------------------------------------------------------------------------------
    def slot_form(self, slot: int) -> SublayerForm:
        """The form in ``slot``, its tensors views of the tables at the slot's own width."""
        width, *settings = self.specs[slot]
        return SublayerForm(self.down[slot, :width], self.down_bias[slot, :width], self.up[slot, :, :width],
                            self.up_bias[slot], *settings)

    def _eager(self, x: torch.Tensor, y: torch.Tensor, seg: Segments) -> torch.Tensor:
        shape = y.shape
        x, y = x.reshape(-1, self.hidden), y.reshape(-1, self.hidden)
        out = y.clone()
        for slot, idx in self.slot_tokens(seg):
            adapted = self.slot_form(slot).apply(x.index_select(0, idx), y.index_select(0, idx))
            out.index_copy_(0, idx, adapted.to(out.dtype))
        return out.view(shape)

    def _static(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        x, y = x.reshape(-1, self.hidden), y.reshape(-1, self.hidden)
        out = self._row_kernel_value(lambda: self._row_kernels(x, y, rows))
        if out is not None:
            return out.view(shape)
        t = self.packed.gather(rows)  # every token's row of every table, one gather
        source = torch.where(t["parallel"] != 0, x, y)
        update = bottleneck_mlp(source, t["down"], t["down_bias"], t["up"], t["up_bias"], self._activation(rows))
        return (y * t["keep"] + t["scaling"] * update).view(shape)

    def _row_kernels(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``_static``'s maths with the down projection in the LoRA row shrink (each token's rows read in place, not
        gathered), then, when the step's adapters share one activation with a kernel form, the rest in one launch
        (``sublayer_kernel.sublayer_expand``); else the up projection in the row expand and the rest in torch (the
        small tables gathered). Rounded as ``bottleneck_mlp``'s: each product with its bias in fp32, then once to the
        activations' dtype. The source is x or y itself when every adapter here reads the same one."""
        from peftlab.serve.kernels import row_expand, row_shrink  # Triton: imported where it runs
        from peftlab.serve.sublayer_kernel import ACTIVATIONS, sublayer_expand

        def pick(table: torch.Tensor) -> torch.Tensor:
            return table.index_select(0, rows)

        sources = self._sources()
        source = (x if sources[0] else y) if len(sources) == 1 else torch.where(pick(self.parallel) != 0, x, y)
        names = self._activations()
        lanes = self.context.static_routed_lanes
        if self.context.static_sublayer_kernel and len(names) == 1 and names[0] in ACTIVATIONS:
            zp = row_shrink(source.contiguous(), [self.down], rows, skip_row=self.capacity, lanes=lanes)[0]
            return sublayer_expand(zp, rows, y.contiguous(), self.down_bias, self.up, self.up_bias, self.keep,
                                   self.scaling, names[0], skip_row=self.capacity, lanes=lanes)
        zp = row_shrink(source.contiguous(), [self.down], rows, lanes=lanes)[0]
        z = (zp.sum(1) + pick(self.down_bias).float()).to(x.dtype)
        h = self._activation(rows)(z).float()
        update = pick(self.up_bias)  # the expand adds up @ h into it
        row_expand(h.view(1, *h.shape[:1], 1, h.shape[1]), [(self.up, update, None)], rows, lanes=lanes)
        return y * pick(self.keep) + pick(self.scaling) * update

    def _activation(self, rows: torch.Tensor):
        """The step's activation: the one of every adapter in the tables, or each token's own slot's."""
        names = self._activations()
        if len(names) == 1:
            return activation_fn(names[0])
        which = self.act_index.index_select(0, rows)[:, None]

        def activation(z: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(z)
            for name in names:
                out = torch.where(which == self.act_names.index(name), activation_fn(name)(z), out)
            return out

        return activation


def install_sublayers(model: nn.Module, decoder_layers: nn.ModuleList,
                      context: StepContext) -> dict[str, BatchedSublayer]:
    """A table on each decoder layer's ``self_attn`` and ``mlp`` of ``model`` (kept as a plain attribute of that
    module, not a submodule), by the module's name; what ``sublayer_output`` reads."""
    names = {id(m): n for n, m in model.named_modules()}
    tables = {}
    for layer in decoder_layers:
        out = layer.self_attn.o_proj
        weight = getattr(out, "base", out).weight  # a BatchedLinear's base linear, or the linear itself
        hidden = out.out_features
        for module in (layer.self_attn, layer.mlp):
            name = names[id(module)]
            tables[name] = BatchedSublayer(name, hidden, context, weight.dtype, weight.device)
            attach_table(module, tables[name])
    return tables


def sublayer_output(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, the output of sub-layer ``module`` for input ``x``, with the adapters of its table (if any)."""
    return table_output(module, PATH, x, y)


def check_sublayer_forms(name: str, forms: dict[str, SublayerForm], tables: dict[str, BatchedSublayer]) -> None:
    """Refuse forms the tables cannot hold: a sub-layer serve does not run as one, or a wrong hidden size."""
    unknown = sorted(set(forms) - set(tables))
    if unknown:
        raise ServeError(f"adapter {name!r}: it adapts {unknown[:3]}, which serve does not run as sub-layers; "
                         "sub-layer adapters are served on each decoder layer's self_attn and mlp")
    for module, form in forms.items():
        hidden = tables[module].hidden
        r = form.rank
        shapes = {"down": (r, hidden), "down_bias": (r,), "up": (hidden, r), "up_bias": (hidden,)}
        bad = {k: tuple(getattr(form, k).shape) for k, shape in shapes.items()
               if tuple(getattr(form, k).shape) != shape}
        if bad:
            raise ServeError(f"adapter {name!r}: on {module!r} (hidden size {hidden}) its bottleneck tensors have "
                             f"shapes {bad}, expected {({k: shapes[k] for k in bad})}")
        try:
            activation_fn(form.non_linearity)
        except ValueError as exc:  # now, not at the first step that reads it
            raise ServeError(f"adapter {name!r}: {exc}") from None
