"""A SiLU-gated MLP's product with per-feature scales, in one autograd node:  y = (silu(g) ⊙ u) ⊙ s

An adapter whose whole effect on the down projection is a vector scaling its input features (IA3 on a feedforward
target: ``AdapterLayer.input_scale``) scales exactly this product. Left to autograd (and to inductor, inside compiled
layers), the vector's gradient ``ds = Σ_t h ⊙ silu(g) ⊙ u`` (h: the gradient reaching y) is a reduction over tokens
that runs as its own kernel, re-reading h, g and u (192 MiB a layer at the 1B shape, B4 x T1024: 1.87 ms of a 46 ms
H100 step), and the SwiGLU backward before it writes a bf16 copy of silu(g) for it. Here the backward is one pass:
a Triton kernel reads h, g and u once, writes the gate and up gradients, and leaves per-block column sums of ds,
which one small sum finishes. The forward is the reference's own ops (inductor fuses them as before), so the
adapted output is the reference's bit for bit.

The gate and up projections may carry output scales too (IA3 on every linear layer: ``AdapterLayer.output_scale``,
g = g0 ⊙ a, u = u0 ⊙ b); the node then takes the raw projections g0, u0 and the vectors, and its backward also
leaves the column sums for a and b. Backward, in fp32 from the saved g0, u0 (σ = sigmoid(g), p = g σ):

    ds = Σ_t h ⊙ p ⊙ u    du = (h ⊙ s) ⊙ p    dg = (h ⊙ s) ⊙ u ⊙ σ (1 + g (1 - σ))
    da = Σ_t dg ⊙ g0      db = Σ_t du ⊙ u0    d g0 = dg ⊙ a    d u0 = du ⊙ b

``scaled_swiglu_backward_reference`` is that in torch (the CPU path; tests compare the kernel with it, in the
Triton interpreter on the CPU, and on CUDA). ``use_scaled_swiglu(model)`` routes the gated MLPs through the node when
their down projection's adaptation is such a vector (checked at every call, on the fast path only: ``fast.enabled``).

Measured (1B shape, compiled layers, bench/README.md): the first form of the node (the down projection's vector
only) made IA3 on every linear layer slower and larger (H200, CUDA graphs: 47.97 ms / 8.26 GiB against 44.61 / 6.17;
H100, compile mode ``default``: 53.99 / 8.32 against 45.91 / 6.19). Found on the CPU after (saved-tensor count of a
compiled layer with an opaque backward op, ``tests/test_scaled_swiglu.py``): it took the *scaled* gate and up as
inputs and kept them, while the vectors' own gradients keep the raw projections as well: two more (tokens,
intermediate) tensors a layer. The current form (output scales folded in) keeps the raw projections only; H100,
twenty-ninth session, two rounds in both orders: 45.24 / 45.55 ms and 6.10 / 6.06 GiB with it against 45.81 / 46.15 ms
and 6.16 / 6.12 GiB without (the frozen base 42.62 ms), ``bench/results/train_step_1b_h100_2026-12-07d_ia3_swiglu2.json``.
So it is on by default in the trainer's steps (``scaled_swiglu_mlps``; ``PEFTLAB_SCALED_SWIGLU=0`` turns it off) and
in the bench worker (``PEFTLAB_BENCH_SCALED_SWIGLU=0``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.ops import fast

# the backward kernel's launch: (BLOCK_T, BLOCK_C) tiles, warps per program, programs aimed at (column blocks x row
# blocks, a few waves of an H100's 132 SMs), and whether the column sums are reduced over each tile's rows at every
# step (1-D accumulators) or once at the end (2-D). bench/swiglu_bwd.py timed 40 choices on an H100 (thirtieth
# session, bench/results/swiglu_bwd_h100_2026-12-07.json): 16 x 128 tiles with 4 warps fastest (258.8 us against the
# old 32 x 128 with 8 warps' 335.3, 4,096 x 8,192, all three vectors); in the 1B IA3 step, two rounds on one machine:
# 44.98 / 45.27 ms against 45.78 / 45.57 (frozen base 42.93 / 43.21: 1.048x against 1.06x)
CONFIG = {"BLOCK_T": 16, "BLOCK_C": 128, "num_warps": 4, "programs": 2048, "EACH": False}
CONFIG.update(json.loads(os.environ.get("PEFTLAB_SWIGLU_CONFIG", "{}")))  # a bench's A/B of the choices

Vec = torch.Tensor | None


def _times(t: torch.Tensor, v: Vec) -> torch.Tensor:
    """An output-scaling adapter's forward on the fast path: ``t * v`` in t's dtype (no scale: t)."""
    return t if v is None else t * v.to(t.dtype)


def scaled_swiglu_reference(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, gate_scale: Vec = None,
                            up_scale: Vec = None) -> torch.Tensor:
    """What the MLP and the adapters compute apart: the gate / up projections' output scales (if any), then
    ``act_fn(gate) * up``, then the down projection's input scale, each in the activations' dtype."""
    x = F.silu(_times(gate, gate_scale)) * _times(up, up_scale)
    return x * scale.to(x.dtype)


def scaled_swiglu_backward_reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                                     gate_scale: Vec = None, up_scale: Vec = None) -> tuple:
    """(d gate, d up, d scale, d gate_scale, d up_scale) for the output gradient ``grad``: the vectors' gradients
    in fp32 (None for an absent vector), the rest computed in fp32 and rounded once. The scaled gate and up are
    rounded to the activations' dtype first, as the forward made them."""
    g0, u0, h = gate.float(), up.float(), grad.float()
    g, u = _times(gate, gate_scale).float(), _times(up, up_scale).float()
    sig = torch.sigmoid(g)
    a = g * sig
    hs = h * scale.to(gate.dtype).float()  # the forward multiplies by the vector in the activations' dtype
    dg, du = hs * u * sig * (1 + g * (1 - sig)), hs * a

    def col_sum(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).sum(0)

    d_gate_scale = None if gate_scale is None else col_sum(dg * g0)
    d_up_scale = None if up_scale is None else col_sum(du * u0)
    if gate_scale is not None:
        dg = dg * gate_scale.to(gate.dtype).float()
    if up_scale is not None:
        du = du * up_scale.to(up.dtype).float()
    return dg.to(gate.dtype), du.to(up.dtype), col_sum(h * a * u), d_gate_scale, d_up_scale


def kernel_usable(x: torch.Tensor) -> bool:
    """The Triton kernel runs for CUDA tensors when Triton imports (``PEFTLAB_SWIGLU_KERNEL=0`` turns it off); for CPU
    tensors only when asked (``PEFTLAB_SWIGLU_KERNEL=1``) under ``TRITON_INTERPRET=1``, as the tests do."""
    flag = os.environ.get("PEFTLAB_SWIGLU_KERNEL", "")
    if flag == "0" or not (x.is_cuda or (flag == "1" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return _HAS_TRITON


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_swiglu_bwd(g_ptr, u_ptr, h_ptr, s_ptr, a_ptr, b_ptr, dg_ptr, du_ptr, part_ptr, rows, cols,
                          rows_per_block, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_A: tl.constexpr,
                          HAS_B: tl.constexpr, EACH: tl.constexpr):
        # part: (3, row blocks, cols) fp32 column sums for the down input scale s, the gate scale a, the up scale b
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < cols
        s = tl.load(s_ptr + c, mask=c_ok, other=0.0).to(g_ptr.dtype.element_ty).to(tl.float32)
        a = tl.load(a_ptr + c, mask=c_ok, other=0.0).to(g_ptr.dtype.element_ty).to(tl.float32)
        b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(u_ptr.dtype.element_ty).to(tl.float32)
        acc_s = tl.zeros((BLOCK_C,) if EACH else (BLOCK_T, BLOCK_C), tl.float32)  # reduced over rows at each step
        acc_a = tl.zeros((BLOCK_C,) if EACH else (BLOCK_T, BLOCK_C), tl.float32)  # (EACH) or once, after the loop
        acc_b = tl.zeros((BLOCK_C,) if EACH else (BLOCK_T, BLOCK_C), tl.float32)
        first = tl.program_id(1) * rows_per_block
        last = tl.minimum(first + rows_per_block, rows)
        for t0 in range(first, last, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = (t < last)[:, None] & c_ok[None, :]
            at = t.to(tl.int64)[:, None] * cols + c[None, :]
            g0 = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
            u0 = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
            g = g0
            u = u0
            if HAS_A:
                g = (g0 * a[None, :]).to(g_ptr.dtype.element_ty).to(tl.float32)
            if HAS_B:
                u = (u0 * b[None, :]).to(u_ptr.dtype.element_ty).to(tl.float32)
            sig = tl.sigmoid(g)
            act = g * sig
            hs = h * s[None, :]
            du = hs * act
            dg = hs * u * sig * (1 + g * (1 - sig))
            if EACH:
                acc_s += tl.sum(h * act * u, 0)
                if HAS_A:
                    acc_a += tl.sum(dg * g0, 0)
                if HAS_B:
                    acc_b += tl.sum(du * u0, 0)
            else:
                acc_s += h * act * u
                if HAS_A:
                    acc_a += dg * g0
                if HAS_B:
                    acc_b += du * u0
            if HAS_A:
                dg = dg * a[None, :]
            if HAS_B:
                du = du * b[None, :]
            tl.store(du_ptr + at, du.to(du_ptr.dtype.element_ty), mask=ok)
            tl.store(dg_ptr + at, dg.to(dg_ptr.dtype.element_ty), mask=ok)
        at = tl.program_id(1).to(tl.int64) * cols + c
        blocks = tl.num_programs(1).to(tl.int64) * cols
        if not EACH:
            acc_s, acc_a, acc_b = tl.sum(acc_s, 0), tl.sum(acc_a, 0), tl.sum(acc_b, 0)
        tl.store(part_ptr + at, acc_s, mask=c_ok)
        if HAS_A:
            tl.store(part_ptr + blocks + at, acc_a, mask=c_ok)
        if HAS_B:
            tl.store(part_ptr + 2 * blocks + at, acc_b, mask=c_ok)

    return scaled_swiglu_bwd


_KERNEL = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid(rows: int, cols: int) -> tuple[int, int, int]:
    """(column blocks, row blocks, rows per row block): ~CONFIG["programs"] programs, whole BLOCK_T steps each."""
    block_t, block_c = CONFIG["BLOCK_T"], CONFIG["BLOCK_C"]
    col_blocks = _cdiv(cols, block_c)
    want = max(1, min(_cdiv(rows, block_t), CONFIG["programs"] // col_blocks))
    per = _cdiv(_cdiv(rows, want), block_t) * block_t
    return col_blocks, _cdiv(rows, per), per


@torch.library.triton_op("peftlab::scaled_swiglu_backward", mutates_args=())
def _backward_op(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                 gate_scale: torch.Tensor, up_scale: torch.Tensor, has_gate_scale: bool, has_up_scale: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, (3, cols) fp32 sums for scale, gate_scale, up_scale); an absent vector's row is not written
    (``has_*`` False: its tensor is only a placeholder)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    rows, cols = gate.shape
    col_blocks, row_blocks, per = _grid(rows, cols)
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    part = torch.zeros((3, row_blocks, cols), dtype=torch.float32, device=gate.device)
    torch.library.wrap_triton(_KERNEL)[(col_blocks, row_blocks)](
        gate, up, grad, scale, gate_scale, up_scale, dg, du, part, rows, cols, per, BLOCK_T=CONFIG["BLOCK_T"],
        BLOCK_C=CONFIG["BLOCK_C"], HAS_A=has_gate_scale, HAS_B=has_up_scale, EACH=CONFIG["EACH"],
        num_warps=CONFIG["num_warps"])
    return dg, du, part.sum(1)


def scaled_swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                           gate_scale: Vec = None, up_scale: Vec = None) -> tuple:
    """``scaled_swiglu_backward_reference``'s contract, by the Triton kernel where ``kernel_usable``."""
    if not kernel_usable(gate) or gate.numel() == 0:
        return scaled_swiglu_backward_reference(gate, up, grad, scale, gate_scale, up_scale)
    cols = gate.shape[-1]
    flat = [t.reshape(-1, cols).contiguous() for t in (gate, up, grad)]
    vecs = [(scale if v is None else v).reshape(cols).contiguous() for v in (scale, gate_scale, up_scale)]
    dg, du, sums = _backward_op(*flat, *vecs, gate_scale is not None, up_scale is not None)
    return (dg.view(gate.shape), du.view(up.shape), sums[0], None if gate_scale is None else sums[1],
            None if up_scale is None else sums[2])


class _ScaledSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, scale, gate_scale, up_scale):
        ctx.save_for_backward(gate, up, scale, gate_scale, up_scale)
        return scaled_swiglu_reference(gate, up, scale, gate_scale, up_scale)

    @staticmethod
    def backward(ctx, grad):
        gate, up, *vecs = ctx.saved_tensors
        dg, du, *dvecs = scaled_swiglu_backward(gate, up, grad, *vecs)
        return dg, du, *(None if d is None else d.reshape(v.shape).to(v.dtype) for d, v in zip(dvecs, vecs))


def scaled_swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, gate_scale: Vec = None,
                  up_scale: Vec = None) -> torch.Tensor:
    """``scaled_swiglu_reference`` as one autograd node (gate, up: the projections' outputs before their own
    output scales, if any; every vector (intermediate,))."""
    if gate.shape != up.shape:
        raise ValueError(f"scaled_swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    for name, v in (("scale", scale), ("gate_scale", gate_scale), ("up_scale", up_scale)):
        if v is not None and v.shape != gate.shape[-1:]:
            raise ValueError(f"scaled_swiglu: {name} {tuple(v.shape)} must be ({gate.shape[-1]},) for gate "
                             f"{tuple(gate.shape)}")
    return _ScaledSwiGLU.apply(gate, up, scale, gate_scale, up_scale)


def use_scaled_swiglu(model: nn.Module) -> list[nn.Module]:
    """Route the model's SiLU-gated MLPs whose down projection's adaptation is a vector on its input (now) through
    the node (checked again at each call: on the fast path, and still such a vector); returns the MLPs changed. MLPs
    whose forward is already replaced on the instance (the lean nodes, ``ops/lean.py``) are left alone."""
    from peftlab.core.adapter import AdaptedModule
    from peftlab.ops.lean import is_swiglu_mlp

    changed = []
    for module in model.modules():
        if is_swiglu_mlp(module) and "forward" not in module.__dict__ \
                and isinstance(module.down_proj, AdaptedModule) and module.down_proj.input_scale() is not None:
            module.forward = _mlp_forward(module)
            changed.append(module)
    return changed


@contextlib.contextmanager
def scaled_swiglu_mlps(model: nn.Module, device: torch.device | None = None) -> Iterator[int]:
    """``use_scaled_swiglu`` for the duration of the block (the number of MLPs changed); their own forward after.
    With ``device`` (the trainer's steps): where the fast path is on for it (``fast.enabled``) unless turned off
    (``PEFTLAB_SCALED_SWIGLU=0``); else nothing changes: 0."""
    on = device is None or (os.environ.get("PEFTLAB_SCALED_SWIGLU") != "0"
                            and fast.enabled(torch.empty(0, device=device)))
    changed = use_scaled_swiglu(model) if on else []
    try:
        yield len(changed)
    finally:
        for module in changed:
            if getattr(module.__dict__.get("forward"), "scaled_swiglu", False):
                del module.forward


def _scale_of(module: nn.Module, which: str) -> Vec:
    """An adapted projection's ``input_scale`` / ``output_scale`` (None: not adapted, or not only a vector; the
    methods are gone after the adapters are detached)."""
    get = getattr(module, which, None)
    return get() if get is not None else None


def _mlp_forward(m: nn.Module):
    def forward(x):
        down = m.down_proj
        scale = _scale_of(down, "input_scale") if fast.enabled(x) else None
        if scale is None or scale.shape[0] != down.base_layer.in_features:
            return down(m.act_fn(m.gate_proj(x)) * m.up_proj(x))
        parts = []
        for proj in (m.gate_proj, m.up_proj):
            v = _scale_of(proj, "output_scale")  # folded in too: the node then keeps the raw projection only
            parts += [proj(x), None] if v is None else [proj.base_layer(x), v]
        gate, gate_scale, up, up_scale = parts
        return down.base_layer(scaled_swiglu(gate, up, scale, gate_scale, up_scale))
    forward.scaled_swiglu = True
    return forward
