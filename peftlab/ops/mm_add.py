"""``x @ op(w) (+ bias) + u @ op(v)``: the fused low-rank nodes' base product plus expand product (``fast.py``), in
three forms. Eagerly, the second product is added into the first's output in place (``addmm_``), which costs nothing
extra. While compiling, the two products are added apart by default (below); the in-place form and an opaque op are
the alternatives.

Inside a compiled graph, functionalisation turns the in-place ``addmm_`` into an out-of-place ``addmm``, and
``addmm`` with a separate output first copies its (tokens, out) input there: one device-to-device copy per adapted
linear, forward and backward (231 copies, 2.8 ms of a 1B LoRA step's ~49 ms of GPU time on an H200). As a custom
op the in-place add stays inside it. Eagerly, ``mm_add`` runs the plain form directly (a custom op's dispatch costs
host time on every call).

Off by default (``PEFTLAB_MM_ADD_OP=1`` turns it on): measured on an H200 (2026-12-04, bench/README.md), the 1B
LoRA step was no faster with it beyond the spread between processes (53.3-61.9 ms in four runs with it, 54.8-65.2
ms in six and one of 75.3 ms without), and two steps got slower in the one call that ran them: the compiled layers
with an activation budget of 0.5 (76.4 ms / 3.35 GiB against 58.7-64.0 ms / 5.18 GiB) and DoRA (97.9 ms against
76.8 on 2026-12-03). Inductor's partitioner cannot see inside the opaque op and decides differently what to
recompute around it, which is the likely cause (not verified).

While compiling, the default (``PEFTLAB_MM_ADD_SPLIT`` unset or ``1``; ``0`` for the in-place form) traces the two
products apart and adds them with a plain ``+``: no copy and no in-place add, and inductor can fuse the add into the
consumer's pointwise kernel (the SwiGLU after gate/up, the rotary after q/k, the residual add after o/down). One
more rounding to bf16 than the in-place form (the second product is rounded before the add, as PEFT's own LoRA
forward does). Inductor keeps ``mm + add`` apart only on a GPU and only where every reader of the sum is pointwise
(its post-grad ``addmm`` pattern, ``should_prefer_unfused_addmm``); elsewhere (and always on the CPU) it fuses them
back into the same ``addmm``, so no CPU proxy shows the difference unless that choice is forced
(``tests/test_mm_add_pass.py`` forces it to count the ``addmm`` a GPU would keep). Measured on an H100 (twentieth
session, bench/README.md), alternating the two forms in four processes: the 1B LoRA step 57.12 / 57.58 ms split
against 58.66 / 58.36 in place, DoRA 63.83 against 65.77, the same peak memory.

Where inductor does fuse the split sum back into an ``addmm`` (a reader that is not pointwise), the copy is back:
the H100 profiles of 2026-12-06 / 07 show 96 ``memcpy128`` a step in the 1B LoRA and VeRA steps, 128 in DoRA's (~18
us each). On the CPU, with inductor made to take its GPU-side choice, a compiled LoRA layer keeps six ``addmm`` (q,
k, v, gate, up: sums saved for backward or read by attention / the rotary's ``cat``; one input gradient): 6 x 16
layers = 96 (``tests/test_mm_add_pass.py``). ``addmm_in_place`` (below) is a post-grad pass that gives those sums to
the in-place op after the partition; on by default since it was measured on an H100 (``inductor_options``;
``PEFTLAB_ADDMM_IN_PLACE=0`` turns it off).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_LIB = torch.library.Library("peftlab", "DEF")
_LIB.define("mm_add(Tensor x, Tensor w, Tensor? bias, Tensor u, Tensor v, bool w_t, bool v_t) -> Tensor")


def mm_add_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                     v: torch.Tensor, w_t: bool, v_t: bool) -> torch.Tensor:
    """x (n, k) @ (w.T if w_t else w) + bias + u (n, r) @ (v.T if v_t else v); a new (n, out) tensor."""
    out = F.linear(x, w, bias) if w_t else (x @ w if bias is None else torch.addmm(bias, x, w))
    return out.addmm_(u, v.t() if v_t else v)


def _shape(x: torch.Tensor, w: torch.Tensor, w_t: bool) -> tuple[int, int]:
    return x.shape[0], w.shape[0] if w_t else w.shape[1]


_LIB.impl("mm_add", mm_add_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("peftlab::mm_add")
def _fake(x, w, bias, u, v, w_t, v_t):
    return x.new_empty(_shape(x, w, w_t))


def mm_add_split(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                 v: torch.Tensor, w_t: bool, v_t: bool) -> torch.Tensor:
    """``mm_add_reference``'s value as two products and a plain add (out of place, fusable by a compiler)."""
    out = F.linear(x, w, bias) if w_t else (x @ w if bias is None else torch.addmm(bias, x, w))
    return out + u @ (v.t() if v_t else v)


def mm_add(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor,
           w_t: bool, v_t: bool) -> torch.Tensor:
    """``mm_add_reference``; while torch.compile traces, as the opaque op with ``PEFTLAB_MM_ADD_OP=1``, else split
    unless ``PEFTLAB_MM_ADD_SPLIT=0``; directly otherwise."""
    if torch.compiler.is_compiling():
        if os.environ.get("PEFTLAB_MM_ADD_OP", "") == "1":
            return torch.ops.peftlab.mm_add(x, w, bias, u, v, w_t, v_t)
        if os.environ.get("PEFTLAB_MM_ADD_SPLIT", "1") != "0":
            return mm_add_split(x, w, bias, u, v, w_t, v_t)
    return mm_add_reference(x, w, bias, u, v, w_t, v_t)


def addmm_in_place(graph: torch.fx.Graph) -> int:
    """Inductor post-grad rewrite: ``addmm(mm(u, v), x, w)``, where the ``mm`` feeds nothing else, becomes
    ``peftlab::mm_add(x, w, None, u, v)``, which adds the second product into the first's output in place. Returns
    the number of rewrites.

    Where a split ``mm_add``'s sum feeds something other than pointwise kernels (the value projection into attention,
    the output projection's input gradient into attention's backward, ...), inductor fuses ``mm + mm`` back into an
    ``addmm`` (``fx_passes/post_grad.py``), and ATen's out-of-place ``addmm`` first copies its (tokens, out) addend
    into the new output (the 1B profiles' ``memcpy128`` rows: see the module's docstring). The rewrite runs after
    the forward / backward partition, so unlike the opaque op while tracing (``PEFTLAB_MM_ADD_OP``) it cannot change
    what the partitioner saves or recomputes."""
    aten, count = torch.ops.aten, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default or len(node.args) != 3:
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        addend, x, w = node.args
        if not (isinstance(addend, torch.fx.Node) and addend.target is aten.mm.default and len(addend.users) == 1):
            continue
        want, have = node.meta.get("val"), addend.meta.get("val")
        if want is None or have is None or have.shape != want.shape or have.dtype != want.dtype:
            continue  # a broadcast addend (a bias) or another dtype: left to addmm
        u, v = addend.args
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.peftlab.mm_add.default, (x, w, None, u, v, False, False))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(addend)
        count += 1
    return count


def addmm_pass_enabled() -> bool:
    """``addmm_in_place`` runs in compiled layers unless ``PEFTLAB_ADDMM_IN_PLACE=0`` (the A/B knob)."""
    return os.environ.get("PEFTLAB_ADDMM_IN_PLACE", "1") != "0"


def inductor_options(mode: str | None) -> dict:
    """torch.compile's ``options`` for inductor in ``mode`` (torch.compile takes a mode or options, not both), with
    ``addmm_in_place`` as the post-grad pass (unless ``PEFTLAB_ADDMM_IN_PLACE=0``).

    On by default since the thirty-fourth session (2026-12-07), measured against the compiled layers without it in
    one run on an H100 (1B, B4 x T1024, CUDA graphs; ``bench/results/train_step_1b_h100_2026-12-07k_addmm*.json``):
    LoRA 57.14 / 57.39 -> 54.88 / 54.29 ms, VeRA 57.48 / 57.32 -> 55.34 / 54.86 ms, DoRA 64.53 -> 60.99 ms; peak
    memory unchanged for LoRA and DoRA, VeRA within 0.04 GiB."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode else {}
    if addmm_pass_enabled():
        options["post_grad_custom_post_pass"] = _addmm_pass()
    return options


@functools.cache
def _addmm_pass():
    """``addmm_in_place`` as inductor's pass object (built on first use: importing inductor takes ~1 s)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class AddmmInPlace(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            addmm_in_place(graph)

        def uuid(self) -> bytes:  # inductor's cache key: this file's text
            return get_hash_for_files((__file__,))
    return AddmmInPlace()
