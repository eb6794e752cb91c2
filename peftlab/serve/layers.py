"""The serving model's linear layers: each holds its adapters in slot tables and reads, at every
forward, the per-token slot index of the current step (``StepContext``), so one forward pass runs
tokens of many adapters (and of the base model) together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import ServingForm
from peftlab.serve.batched import PackedRows, PackedTable, folded_vera, grown, lowrank_torch, lowrank_triton, \
    restacked, row_lowrank, scaled_lowrank_grouped
from peftlab.serve.context import KernelPlan, StepContext, run_triton, triton_value
from peftlab.serve.module_table import TABLES, attach_table
from peftlab.serve.routed import PATH as ROUTED, RoutedLowRank, routed_output


# VeRA forms up to this rank are served as the LoRA (diag(up_scale) P_B, diag(mid) P_A) of their slot: one more
# segment of the grouped LoRA kernel instead of a separate per-slot path (exact up to rounding). The shared
# projections are then not shared in GPU memory; a larger rank (VeRA's are often 256) would widen every slot's
# padded rank, so those keep the shared-projection path.
FOLD_RANK = 64


class BatchedLinear(nn.Module):
    """A base ``nn.Linear`` plus ``capacity`` adapter slots; see ``peftlab.serve.batched`` for the maths.

    The per-slot tables live in two packed groups, so that the fixed-shape step gathers a token's low-rank factors
    with one gather and its scales (IA3 / DoRA, VeRA's vectors) with another."""

    down, up = PackedTable("lowrank"), PackedTable("lowrank")  # (rows, R, in), (rows, out, R)
    out_scale, bias_scale, in_scale = PackedTable("scales"), PackedTable("scales"), PackedTable("scales")  # (rows, out|in)
    mid, vup = PackedTable("scales"), PackedTable("scales")  # VeRA per slot: (rows, R), (rows, out)

    def __init__(self, base: nn.Linear, name: str, capacity: int, context: StepContext, use_triton: bool = False,
                 initial_rank: int = 16, fold_rank: int = FOLD_RANK):
        super().__init__()
        self.base, self.name, self.capacity, self.context = base, name, capacity, context
        self.use_triton, self.fold_rank = use_triton, fold_rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.dtype, self.device = w.dtype, w.device
        rows = capacity + 1  # + the identity row read by base-model tokens
        self.lowrank, self.scales = PackedRows(), PackedRows()
        self.down = torch.zeros(rows, initial_rank, self.in_features, dtype=self.dtype, device=self.device)
        self.up = torch.zeros(rows, self.out_features, initial_rank, dtype=self.dtype, device=self.device)
        self.ranks = [0] * rows  # the scale tables are allocated on first use
        # VeRA: shared projections stored once per distinct value, per-slot vectors
        self.proj_down: list[torch.Tensor] = []
        self.proj_up: list[torch.Tensor] = []
        self.proj_users: list[int] = []
        self.proj_down_t: torch.Tensor | None = None  # (P, R, in) stacked, zero-padded to the widest rank
        self.proj_up_t: torch.Tensor | None = None  # (P, out, R)
        self.proj_of_slot = [-1] * rows
        self.proj_index: torch.Tensor | None = None  # (rows,) proj_of_slot on the device (0 where none): graphs.py
        self.cat_weight: torch.Tensor | None = None  # [W0; P_A] while one projection pair is stored: _sync_cat
        self.lora_slots: set[int] = set()
        self.out_slots: set[int] = set()
        self.in_slots: set[int] = set()
        self.vera_slots: set[int] = set()
        self.used_slots: set[int] = set()  # the union of the four above

    # -- slots ---------------------------------------------------------------------------------
    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(self.capacity + 1, n, dtype=self.dtype, device=self.device)

    def routed(self) -> RoutedLowRank:
        """This layer's table of routed adapters (MoLoRA, ``serve/routed.py``), attached on first use."""
        table = self.__dict__.get(TABLES, {}).get(ROUTED)
        if table is None:
            table = RoutedLowRank(self.name, self.in_features, self.out_features, self.context, self.dtype,
                                  self.device)
            attach_table(self, table)
        return table

    def set_slot(self, slot: int, form: ServingForm | None) -> None:
        """Put an adapter's form into ``slot`` (None: this adapter does not touch this layer). Plain tensors are
        copied straight from (pinned) host memory into the slot's rows: one copy each, no synchronisation. A
        routed form (MoLoRA) goes to the layer's routed table."""
        if form is not None and form.router is not None:
            self.clear_slot(slot)
            self.routed().set_slot(slot, form)
            return
        lora_rank = 0 if form is None or form.down is None or (form.vera_like and form.rank > self.fold_rank) \
            else form.rank
        self.clear_slot(slot, zero_lowrank=lora_rank != self.down.shape[1])  # full-width rows are overwritten anyway
        if form is None:
            return
        if form.vera_like:  # compared with the stored projections, or folded, on the device in the table's dtype
            form = form.to(device=self.device, dtype=self.dtype, non_blocking=True)
        if form.in_scale is not None:
            self.in_scale = self._ones(self.in_features) if self.in_scale is None else self.in_scale
            self.in_scale[slot].copy_(form.in_scale, non_blocking=True)
            self.in_slots.add(slot)
            self.used_slots.add(slot)
        if form.out_scale is not None:
            self.out_scale = self._ones(self.out_features) if self.out_scale is None else self.out_scale
            self.out_scale[slot].copy_(form.out_scale, non_blocking=True)
            if self.base.bias is not None:
                self.bias_scale = self._ones(self.out_features) if self.bias_scale is None else self.bias_scale
                if form.scale_bias:  # else it stays at clear_slot's 1
                    self.bias_scale[slot].copy_(form.out_scale, non_blocking=True)
            self.out_slots.add(slot)
            self.used_slots.add(slot)
        if not lora_rank:
            if form.down is not None:
                self._set_vera(slot, form)
            return
        down, up = folded_vera(form) if form.vera_like else (form.down, form.up)
        r = form.rank
        if r > self.down.shape[1]:
            self.down, self.up = grown(self.down, 1, r), grown(self.up, 2, r)
        self.down[slot, :r].copy_(down, non_blocking=True)
        self.up[slot, :, :r].copy_(up, non_blocking=True)
        self.ranks[slot] = r
        self.lora_slots.add(slot)
        self.used_slots.add(slot)

    def _set_vera(self, slot: int, form: ServingForm) -> None:
        r = form.rank
        mid = form.mid_scale if form.mid_scale is not None else torch.ones(r, dtype=self.dtype, device=self.device)
        vup = form.up_scale if form.up_scale is not None else self._ones(self.out_features)[0]
        p = next((i for i, (d, u) in enumerate(zip(self.proj_down, self.proj_up))
                  if self.proj_users[i] > 0 and d.shape[0] == r and torch.equal(d, form.down) and torch.equal(u, form.up)),
                 -1)
        if p < 0:
            p = self.proj_users.index(0) if 0 in self.proj_users else len(self.proj_users)
            if p == len(self.proj_users):
                self.proj_down.append(form.down.contiguous())
                self.proj_up.append(form.up.contiguous())
                self.proj_users.append(0)
            else:
                self.proj_down[p], self.proj_up[p] = form.down.contiguous(), form.up.contiguous()
        self.proj_users[p] += 1
        self.proj_of_slot[slot] = p
        if self.proj_index is None:
            self.proj_index = torch.zeros(self.capacity + 1, dtype=torch.int64, device=self.device)
        self.proj_index[slot] = p
        width = max(r, 0 if self.mid is None else self.mid.shape[1])
        if self.mid is None:
            self.mid = torch.zeros(self.capacity + 1, width, dtype=self.dtype, device=self.device)
            self.vup = self._ones(self.out_features)
        elif width > self.mid.shape[1]:
            self.mid = grown(self.mid, 1, width)
        self.mid[slot].zero_()
        self.mid[slot, :r] = mid
        self.vup[slot] = vup
        self.vera_slots.add(slot)
        self.used_slots.add(slot)
        # restacked in place when the shape holds, so that a captured decode step keeps reading the same tensors
        self.proj_down_t = restacked(self.proj_down_t, [F.pad(d, (0, 0, 0, width - d.shape[0])) for d in self.proj_down])
        self.proj_up_t = restacked(self.proj_up_t, [F.pad(u, (0, width - u.shape[1])) for u in self.proj_up])
        self._sync_cat()

    def _sync_cat(self) -> None:
        """With one stored projection pair and a base without bias: ``cat_weight`` = [W0; P_A] (out + R, in), the base
        weight made a view of its first rows (no second copy of W0), so the fixed-shape step gets W0 x and P_A x from
        one GEMM. Rewritten in place while its shape holds (a captured step keeps reading it)."""
        w = self.base.weight
        if self.proj_down_t.shape[0] != 1 or self.base.bias is not None or w.dim() != 2:
            return
        rows = self.out_features + self.proj_down_t.shape[1]
        if self.cat_weight is None or self.cat_weight.shape[0] != rows:
            cat = torch.empty(rows, self.in_features, dtype=w.dtype, device=w.device)
            cat[:self.out_features].copy_(w.data)
            w.data = cat[:self.out_features]  # the model's parameter now reads the new storage
            self.cat_weight = cat
        self.cat_weight[self.out_features:].copy_(self.proj_down_t[0])
        # the stacked projection becomes a view of those rows (restacked in place into them from now on): P_A is not
        # kept a second time on the device
        self.proj_down_t = self.cat_weight[self.out_features:].unsqueeze(0)

    def clear_slot(self, slot: int, zero_lowrank: bool = True) -> None:  # set_slot starts here too
        self.context.slot_changes += 1
        self.routed().clear_slot(slot)
        if slot in self.lora_slots and zero_lowrank:
            self.down[slot].zero_()
            self.up[slot].zero_()
            self.ranks[slot] = 0
        for table in (self.out_scale, self.bias_scale, self.in_scale):
            if table is not None:
                table[slot] = 1
        p = self.proj_of_slot[slot]
        if p >= 0:
            self.proj_users[p] -= 1
            self.proj_of_slot[slot] = -1
            self.mid[slot].zero_()  # the fixed-shape step reads every row's VeRA term: zero for a non-VeRA slot
        for used in (self.lora_slots, self.out_slots, self.in_slots, self.vera_slots, self.used_slots):
            used.discard(slot)

    # -- forward -------------------------------------------------------------------------------
    def static_signature(self) -> tuple:
        """What a captured fixed-shape step depends on: the tables it reads (replaced when they grow or first
        appear) and which paths run. Slot contents may change between replays; these may not."""
        return (id(self.lowrank.data), id(self.scales.data), bool(self.lora_slots), id(self.cat_weight),
                id(self.proj_down_t), id(self.proj_up_t), id(self.proj_index), bool(self.vera_slots))

    def _scaled_base(self, x2: torch.Tensor, scales: dict[str, torch.Tensor], scale_in: bool,
                     scale_out: bool) -> torch.Tensor:
        """``out_scale ⊙ W0 (in_scale ⊙ x) + bias_scale ⊙ b`` per token (``scales``: the tokens' gathered rows of
        ``self.scales``), each scale only where asked."""
        if scale_in:
            x2 = x2 * scales["in_scale"]
        if not scale_out:
            return self.base(x2)
        y = F.linear(x2, self.base.weight).mul_(scales["out_scale"])
        if self.base.bias is not None:
            y.addcmul_(self.base.bias, scales["bias_scale"])
        return y

    def _step_paths(self) -> tuple[bool, bool, bool, bool]:
        """(lora, out, in, vera): which of this layer's paths the fixed-shape step runs, those its tokens' adapters
        use (``StepContext.static_paths``) and this layer has."""
        paths = self.context.static_paths
        return ("lora" in paths and bool(self.lora_slots), "out" in paths and self.out_scale is not None,
                "in" in paths and self.in_scale is not None, "vera" in paths and bool(self.vera_slots))

    def _forward_static(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Every token's adapter gathered by its row (base tokens read the identity row): no host-side grouping,
        so the step has one shape whatever the mix of adapters."""
        if not any(self._step_paths()):
            return self.base(x)
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features)
        y = self._static_kernels(xf, rows) if self.context.static_triton else None
        if y is None:
            y = self._static_torch(xf, rows)
        return y.reshape(*lead, self.out_features)

    def _static_torch(self, xf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lora, scale_out, scale_in, vera = self._step_paths()
        # one gather for every scale table (a small kernel less per table)
        scales = self.scales.gather(rows) if scale_out or scale_in or vera else {}
        y = self._scaled_base(xf, scales, scale_in, scale_out)
        # y is this step's own tensor (tables and activations share the model's dtype): the adapter terms are added
        # in place, one kernel fewer each (a graph-replayed decode step is bound by its count of small kernels)
        if lora:
            factors = self.lowrank.gather(rows)  # down and up in one gather
            z = torch.bmm(factors["down"], xf.unsqueeze(-1))  # (T, R, 1)
            y.unsqueeze(-1).baddbmm_(factors["up"], z)
        if vera:
            self._vera_static(xf, rows, scales["mid"], scales["vup"], y)
        return y

    def _kernels_ready(self) -> bool:
        """Whether the fixed-shape step runs this layer's LoRA in the Triton row kernels (with its other paths)."""
        return self._step_paths()[0] and self.use_triton and self.context.triton_error is None

    def _kernel_plan(self, rows: torch.Tensor) -> KernelPlan:
        """How ``_static_kernels`` runs this step: the Triton row kernels for LoRA's shrink and expand (with DoRA /
        IA3's output scale folded into the expand when the base has no bias), IA3's input scale, and VeRA on one
        shared projection pair as a product plus one kernel that applies both of its vectors around the second
        product (four launches -> two); VeRA with several pairs stays on its products over all tokens (read per
        token by the LoRA row kernels, a rank-256 pair cost the mixed batch 0.66x -> 0.49x of the base, H200)."""
        _, scale_out, scale_in, vera = self._step_paths()
        fold = scale_out and self.base.bias is None
        row_scales = self.context.static_row_scales
        one_pair = row_scales and vera and self.proj_down_t.shape[0] == 1
        in_base = one_pair and self.context.static_vera_in_base and self.cat_weight is not None
        torch_in = scale_in and not row_scales
        scales = self.scales.gather(rows) if (vera and not one_pair) or torch_in or (scale_out and not fold) else {}
        return KernelPlan(scale_in, scale_out, vera, fold, one_pair, in_base, torch_in, scales)

    def _kernel_base(self, xc: torch.Tensor, rows: torch.Tensor, plan: KernelPlan) -> tuple:
        """(y, z): the step's base output before the LoRA term and, with VeRA on one pair, P_A x (else None)."""
        from peftlab.serve import kernels

        xin = xc if not plan.scale_in else xc * plan.scales["in_scale"] if plan.torch_in else \
            kernels.row_scale(xc, self.in_scale, rows)
        if plan.in_base:  # [W0 x, P_A x] in one GEMM (no bias here); x scaled by IA3 only on tokens without VeRA
            both = F.linear(xin, self.cat_weight)
            return both[:, :self.out_features], both[:, self.out_features:]
        y = self._scaled_base(xin, plan.scales, False, plan.scale_out and not plan.fold)
        return y, F.linear(xc, self.proj_down_t[0]) if plan.one_pair else None

    def _kernel_lowrank(self, y: torch.Tensor, plan: KernelPlan) -> tuple:
        """This layer's part of a ``row_lowrank`` call: (down, up, out, out_scale or None)."""
        return self.down, self.up, y, self.out_scale if plan.fold else None

    def _kernel_vera_pair(self, z: torch.Tensor | None, rows: torch.Tensor, plan: KernelPlan, y: torch.Tensor) -> None:
        """VeRA on one shared pair into y by ``row_scaled_matmul`` (with the other launches, inside their error
        handling); z = P_A x from ``_kernel_base``."""
        if plan.one_pair:
            from peftlab.serve import kernels

            kernels.row_scaled_matmul(z, self.proj_up_t[0], rows, y, in_scale=self.mid, out_scale=self.vup)

    def _kernel_vera_pairs(self, xf: torch.Tensor, rows: torch.Tensor, plan: KernelPlan, y: torch.Tensor) -> None:
        """VeRA on several shared pairs into y by torch products, after the Triton launches ran."""
        if plan.vera and not plan.one_pair:
            self._vera_static(xf, rows, plan.scales["mid"], plan.scales["vup"], y)

    def _static_kernels(self, xf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The fixed-shape step with the adapter terms in Triton row kernels, which read each token's table rows in
        place (no gathered copies): see ``_kernel_plan``. None when the kernels are off or failed (the torch form
        then runs). ``serve.shared.shared_input`` runs the same for layers that read one input, LoRA in one launch."""
        if not self._kernels_ready():
            return None
        plan = self._kernel_plan(rows)
        xc = xf.contiguous()

        def run() -> torch.Tensor:
            y, z = self._kernel_base(xc, rows, plan)
            down, up, _, out_scale = self._kernel_lowrank(y, plan)
            row_lowrank(xc, down, up, rows, y, skip_row=self.capacity, out_scale=out_scale,
                        lanes=self.context.static_row_lanes)
            self._kernel_vera_pair(z, rows, plan, y)
            return y

        y = self._triton_value(run)
        if y is not None:
            self._kernel_vera_pairs(xf, rows, plan, y)
        return y

    def _vera_static(self, x: torch.Tensor, rows: torch.Tensor, mid: torch.Tensor, vup: torch.Tensor,
                     y: torch.Tensor) -> None:
        """Adds unfolded VeRA by row into ``y``: every stored projection pair runs on every token (adapters made from
        one key share a pair, so there are few; with one, two plain products), each token keeps its own pair's
        result; rows of non-VeRA slots have mid = 0. ``mid``, ``vup``: the tokens' rows of those tables."""
        if self.proj_down_t.shape[0] == 1:
            y.addcmul_(F.linear(F.linear(x, self.proj_down_t[0]) * mid, self.proj_up_t[0]), vup)
            return
        pick = self.proj_index.index_select(0, rows)[:, None, None]  # (T, 1, 1)

        def own(z: torch.Tensor) -> torch.Tensor:  # (T, P, n) -> (T, n): each token's projection pair
            return z.gather(1, pick.expand(-1, 1, z.shape[2])).squeeze(1)

        z = own(torch.einsum("ti,pri->tpr", x, self.proj_down_t)) * mid
        y.addcmul_(own(torch.einsum("tr,por->tpo", z, self.proj_up_t)), vup)

    def _row_scaled_base(self, xf: torch.Tensor, rows: torch.Tensor, scale_in: bool,
                         scale_out: bool) -> torch.Tensor | None:
        """``_scaled_base`` with the scales applied by ``kernels.row_scale``, each reading only its own table's rows
        (the packed gather copies every scale table, VeRA's vectors included, for every token: at prefill, thousands
        of tokens); None without Triton or with a bias (the torch form then runs)."""
        if self.base.bias is not None:
            return None
        from peftlab.serve import kernels

        def run() -> torch.Tensor:
            xin = kernels.row_scale(xf.contiguous(), self.in_scale, rows) if scale_in else xf
            y = F.linear(xin, self.base.weight)
            return kernels.row_scale(y, self.out_scale, rows) if scale_out else y

        return self._triton_value(run)

    def _triton_value(self, kernels) -> torch.Tensor | None:
        """``kernels()``'s result when the Triton launches in it ran, else None (off or failed: see ``_triton``)."""
        return triton_value(self.context, kernels, self.use_triton)

    def _triton(self, kernels) -> bool:
        """Runs ``kernels()`` if this layer's Triton kernels may run (``context.run_triton``); says whether they ran."""
        return run_triton(self.context, kernels, self.use_triton)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routed_output(self, x, self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.static_rows is not None:
            return self._forward_static(x, ctx.static_rows) if ctx.static_paths else self.base(x)
        present = ctx.present
        if present.isdisjoint(self.used_slots):
            return self.base(x)
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features)
        scale_in, scale_out = bool(present & self.in_slots), bool(present & self.out_slots)
        y = self._row_scaled_base(xf, ctx.rows, scale_in, scale_out) if scale_in or scale_out else None
        if y is None:
            y = self._scaled_base(xf, self.scales.gather(ctx.rows) if scale_in or scale_out else {}, scale_in,
                                  scale_out)
        if present & self.lora_slots:
            if not self._triton(lambda: lowrank_triton(xf, self.down, self.up, ctx.seg, out=y)):
                lowrank_torch(xf, self.down, self.up, ctx.seg, self.ranks, out=y)
        if present & self.vera_slots:
            scaled_lowrank_grouped(xf, self.proj_down_t, self.proj_up_t, self.proj_of_slot, self.mid, self.vup,
                                   ctx.seg, out=y)
        return y.reshape(*lead, self.out_features)


def install(model: nn.Module, capacity: int, use_triton: bool = False,
            skip: frozenset[str] | None = None) -> tuple[StepContext, dict[str, BatchedLinear]]:
    """Replace every ``nn.Linear`` of ``model`` except the output head by a ``BatchedLinear`` sharing its weight;
    returns the step context they read and the layers by module name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    context = StepContext(capacity, use_triton=use_triton)
    layers: dict[str, BatchedLinear] = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head or (skip and name in skip):
            continue
        layer = BatchedLinear(module, name, capacity, context, use_triton=use_triton)
        layer.routed()  # present from the start: the fixed-shape steps list the tables once
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[name] = layer
    return context, layers
