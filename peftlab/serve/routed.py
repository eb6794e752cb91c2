"""Slot tables for mixtures of LoRA experts (MoLoRA: ``ServingForm.router``) on the linear layers, one table per
``BatchedLinear`` beside its own tables (a ``ModuleTable`` attached to it, path ``routed``). A token of slot s gets

    y'[t] = y[t] + up[s] ((down[s] x[t]) ⊙ g[t] per expert block),   g[t] = mixture_gates(router[s] x[t], top_k[s])

(y: the layer's output with its other adapters; up carries the scaling). Adapters of different expert counts and
ranks are zero-padded to the widest: each expert's block keeps its own place (block e at columns e R .. e R + r),
padded experts are never chosen (``experts`` per slot), padded rank columns are zero in up. A slot without a
routed adapter here (and the identity row base-model tokens read) is all zeros: its tokens get exactly ``y``; an
eager step does not even compute them. Eager steps apply each present slot's form to its tokens at its own size
(``ServingForm.apply``'s maths, the method's own); the fixed-shape step runs the same maths batched, on CUDA
through the row kernels (each token's rows read in place: ``kernels.row_shrink`` of the experts' A and the router,
then ``route_kernel.route_expand``, the gates and the expand over the chosen experts' columns of B in one launch;
the tables of layers that read one input, q / k / v and gate / up, share that pair of launches: ``routed_outputs``),
else by gathering every token's rows (one ``index_select`` of the packed tables) into batched products. The routed
term is added after the layer's own kernels.
"""
from __future__ import annotations

import torch

from peftlab.core.adapter import ServingForm
from peftlab.core.serving_form import mixture_gates
from peftlab.serve.batched import PackedTable, Segments, grown
from peftlab.serve.context import StepContext, run_triton
from peftlab.serve.module_table import TABLES, ModuleTable, table_output

PATH = "routed"  # the fixed-shape step's adapter path (``StepContext.static_paths``)


class RoutedLowRank(ModuleTable):
    """``capacity`` slots (+ the identity row) of routed low-rank adapters on one linear (in -> out); allocated on
    the first adapter that uses it. ``specs``: slot -> (experts, rank, top_k)."""

    path = PATH
    down, up, router = PackedTable("packed"), PackedTable("packed"), PackedTable("packed")  # (rows, E, R, in),
    # (rows, out, E, R), (rows, E, in)
    top_k, experts = PackedTable("packed"), PackedTable("packed")  # (rows, 1) each, numbers in the tables' dtype

    def __init__(self, name: str, in_features: int, out_features: int, context: StepContext, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(name, context, dtype, device)
        self.in_features, self.out_features = in_features, out_features

    def _fit(self, experts: int, rank: int) -> None:
        """Tables at least ``experts`` x ``rank`` wide (allocated, or grown keeping every slot's rows)."""
        if self.packed.data is None:
            z = self.zeros
            self.down, self.up, self.router = z(experts, rank, self.in_features), z(self.out_features, experts, rank), \
                z(experts, self.in_features)
            self.top_k, self.experts = z(1), z(1)
            return
        e, r = max(experts, self.router.shape[1]), max(rank, self.down.shape[2])
        if (e, r) != tuple(self.down.shape[1:3]):
            self.down = grown(grown(self.down, 1, e), 2, r)
            self.up = grown(grown(self.up, 2, e), 3, r)
            self.router = grown(self.router, 1, e)

    def set_slot(self, slot: int, form: ServingForm | None) -> None:
        """Put an adapter's form into ``slot`` (None, or a form without a router: nothing routed here)."""
        self.clear_slot(slot)
        if form is None or form.router is None:
            return
        experts = form.router.shape[0]
        rank = form.rank // experts
        self._fit(experts, rank)
        self.down[slot, :experts, :rank].copy_(form.down.reshape(experts, rank, -1), non_blocking=True)
        self.up[slot, :, :experts, :rank].copy_(form.up.reshape(self.out_features, experts, rank), non_blocking=True)
        self.router[slot, :experts].copy_(form.router, non_blocking=True)
        self.top_k[slot], self.experts[slot] = form.top_k, experts
        self.specs[slot] = (experts, rank, form.top_k)
        self.slots.add(slot)

    def slot_form(self, slot: int) -> ServingForm:
        """The form in ``slot`` at its own size (views of the tables)."""
        experts, rank, top_k = self.specs[slot]
        return ServingForm(down=self.down[slot, :experts, :rank].reshape(experts * rank, -1),
                           up=self.up[slot, :, :experts, :rank].reshape(self.out_features, experts * rank),
                           router=self.router[slot, :experts], top_k=top_k)

    # -- forward -------------------------------------------------------------------------------
    def _eager(self, x: torch.Tensor, y: torch.Tensor, seg: Segments) -> torch.Tensor:
        shape = y.shape
        x, out = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features).clone()
        for slot, idx in self.slot_tokens(seg):
            out.index_add_(0, idx, self.slot_form(slot).lowrank(x.index_select(0, idx)).to(out.dtype))
        return out.view(shape)

    def _static(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        x, y = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        out = self._row_kernel_value(lambda: self._row_kernels(x.contiguous(), y.contiguous(), rows))
        if out is not None:
            return out.view(shape)
        t = self.packed.gather(rows)  # every token's rows of every table, one gather
        logits = torch.einsum("ti,tei->te", x, t["router"]).float()
        gates = mixture_gates(logits, t["top_k"][:, 0].long(), t["experts"][:, 0].long())
        z = torch.einsum("ti,teri->ter", x, t["down"]) * gates.unsqueeze(-1).to(x.dtype)
        # y + up z rounded once, as the LoRA form's baddbmm and the row kernels round it
        return torch.baddbmm(y.unsqueeze(-1), t["up"].flatten(2), z.flatten(1).unsqueeze(-1)).view(shape)

    def _row_kernels(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``out`` with the fixed-shape step's routed term added into it by the row kernels, each token's rows read in
        place (no gather of the tables): ``row_terms``, or with ``static_route_kernel`` off the gates in torch on (T,
        E) between the shrink and the LoRA expand. Rounding as ``_static``'s torch maths: logits, rank activations
        and gates in the tables' dtype."""
        if self.context.static_route_kernel:
            row_terms([self], x, [out], rows)
            return out
        from peftlab.serve.kernels import row_expand, row_shrink  # Triton: imported where it runs

        experts, rank = self.down.shape[1:3]
        zp = row_shrink(x, [self.down.flatten(1, 2), self.router], rows,  # the identity row: zeros, gates zero
                        lanes=self.context.static_routed_lanes)
        z = zp[0].sum(1).to(x.dtype)
        logits = zp[1, :, :, :experts].sum(1).to(x.dtype).float()
        top_k, count = (table.index_select(0, rows)[:, 0].long() for table in (self.top_k, self.experts))
        gates = mixture_gates(logits, top_k, count).to(x.dtype).repeat_interleave(rank, dim=1)
        mid = (z * gates).float().view(1, len(rows), 1, experts * rank)
        row_expand(mid, [(self.up.flatten(2, 3), out, None)], rows, skip_row=self.capacity,
                   lanes=self.context.static_routed_lanes)
        return out

    def grouped_here(self) -> bool:
        """Whether this step may run this table's routed term in a launch shared with other tables (``row_terms``):
        a fixed-shape step with this table's path and slots, the row kernels and the route kernel on."""
        ctx = self.context
        return (ctx.static_rows is not None and self.runs_static() and self.row_kernels_allowed()
                and ctx.static_route_kernel and ctx.triton_error is None)


def row_terms(tables: list[RoutedLowRank], x: torch.Tensor, outs: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Each table's routed term added into its ``outs`` (T, N_g) for input ``x`` (T, in), read by the tokens' ``rows``
    (tables of one step context; up to ``kernels.MAX_GROUP``): one shrink of every table's experts' A and router,
    then one ``route_kernel.route_expand`` (the gates, and the expand over the chosen experts' columns of B)."""
    from peftlab.serve.kernels import row_shrink  # Triton: imported where it runs
    from peftlab.serve.route_kernel import route_expand

    skip = tables[0].capacity  # the identity row: nothing routed
    zp = row_shrink(x, [d for t in tables for d in (t.down.flatten(1, 2), t.router)], rows, skip_row=skip,
                    lanes=tables[0].context.static_routed_lanes)
    route_expand(zp, [(t.up.flatten(2, 3), out, t.top_k, t.experts, *t.down.shape[1:3]) for t, out in zip(tables, outs)],
                 rows, skip_row=skip, lanes=tables[0].context.static_routed_lanes)


def routed_output(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, the output of ``layer`` (a ``BatchedLinear``) for input ``x``, with its routed adapters (if any)."""
    return table_output(layer, PATH, x, y)


def routed_outputs(x: torch.Tensor, layers: list, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[routed_output(m, x, y) for m, y in zip(layers, ys)]`` for layers that read the same input ``x``; in a
    fixed-shape step the routed terms of their tables run in grouped launches (``row_terms``, up to
    ``kernels.MAX_GROUP`` tables a pair of launches) where two or more may."""
    from peftlab.serve.kernels import MAX_GROUP

    tables = [m.__dict__.get(TABLES, {}).get(PATH) for m in layers]
    joined = [i for i, t in enumerate(tables) if t is not None and t.grouped_here()]
    if len(joined) < 2:
        return [routed_output(m, x, y) for m, y in zip(layers, ys)]
    ctx, rows = tables[joined[0]].context, tables[joined[0]].context.static_rows
    xc = x.reshape(-1, x.shape[-1]).contiguous()
    outs = {i: ys[i].reshape(-1, ys[i].shape[-1]).contiguous() for i in joined}
    done: list[int] = []  # the layers whose term is in outs (a launch that fails writes nothing)

    def run() -> None:
        for start in range(0, len(joined), MAX_GROUP):
            part = joined[start:start + MAX_GROUP]
            row_terms([tables[i] for i in part], xc, [outs[i] for i in part], rows)
            done.extend(part)

    run_triton(ctx, run, True)  # on a failure (the context says why) the other tables run their torch maths
    return [outs[i].view(ys[i].shape) if i in done else routed_output(m, x, ys[i]) for i, m in enumerate(layers)]
