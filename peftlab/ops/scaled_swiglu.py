"""A SiLU-gated MLP's product with a per-feature scale, in one autograd node:  y = (silu(g) ⊙ u) ⊙ s

An adapter whose whole effect on the down projection is a vector scaling its input features (IA3 on a feedforward
target: ``AdapterLayer.input_scale``) scales exactly this product. Left to autograd (and to inductor, inside compiled
layers), the vector's gradient ``ds = Σ_t h ⊙ silu(g) ⊙ u`` (h: the gradient reaching y) is a reduction over tokens
that runs as its own kernel, re-reading h, g and u (192 MiB a layer at the 1B shape, B4 x T1024: 1.87 ms of a 46 ms
H100 step), and the SwiGLU backward before it writes a bf16 copy of silu(g) for it. Here the backward is one pass:
a Triton kernel reads h, g and u once, writes the gate and up gradients, and leaves per-block column sums of ds,
which one small sum finishes. The forward is the reference's own ops (inductor fuses them as before), so the
adapted output is the reference's bit for bit.

Backward, in fp32 from the saved g, u (σ = sigmoid(g), a = g σ):

    ds = Σ_t h ⊙ a ⊙ u      du = (h ⊙ s) ⊙ a      dg = (h ⊙ s) ⊙ u ⊙ σ (1 + g (1 - σ))

``scaled_swiglu_backward_reference`` is that in torch (the CPU path; tests compare the kernel with it, in the
Triton interpreter on the CPU, and on CUDA). ``use_scaled_swiglu(model)`` routes the gated MLPs through the node when
their down projection's adaptation is such a vector (checked at every call, on the fast path only: ``fast.enabled``).

Measured (H200, 1B shape, compiled layers with CUDA graphs, one call, twenty-eighth session,
``bench/results/train_step_1b_h200_2026-12-07b_ia3_swiglu.json``): IA3 47.97 ms / 8.26 GiB with the node against
44.61 ms / 6.17 GiB without it (the compiled frozen base 41.41 ms). So the node is off by default: the trainer's steps
use it only with ``PEFTLAB_SCALED_SWIGLU=1`` (the bench worker with ``PEFTLAB_BENCH_SCALED_SWIGLU=1``). Why it costs
~2 GiB (about two (tokens, intermediate) bf16 tensors a layer) and 3.4 ms is not known yet: no graph break in the
compiled layer (checked on the CPU), and on the CPU the compiled layer saves the same tensors with or without it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.ops import fast

_BLOCK_T, _BLOCK_C = 32, 128
_TARGET_PROGRAMS = 2048  # column blocks x row blocks, a few waves of an H100's 132 SMs


def scaled_swiglu_reference(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the MLP and the adapter compute apart: ``act_fn(gate) * up``, then the input scale in the product's dtype."""
    x = F.silu(gate) * up
    return x * scale.to(x.dtype)


def scaled_swiglu_backward_reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, d scale (fp32)) for the output gradient ``grad``, in fp32, rounded once."""
    g, u, h = gate.float(), up.float(), grad.float()
    sig = torch.sigmoid(g)
    a = g * sig
    ds = (h * a * u).reshape(-1, g.shape[-1]).sum(0)
    hs = h * scale.float()
    return (hs * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (hs * a).to(up.dtype), ds


def kernel_usable(x: torch.Tensor) -> bool:
    """The Triton kernel runs for CUDA tensors when Triton imports (``PEFTLAB_SWIGLU_KERNEL=0`` turns it off); for CPU
    tensors only when asked (``PEFTLAB_SWIGLU_KERNEL=1``) under ``TRITON_INTERPRET=1``, as the tests do."""
    flag = os.environ.get("PEFTLAB_SWIGLU_KERNEL", "")
    if flag == "0" or not (x.is_cuda or (flag == "1" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return importlib.util.find_spec("triton") is not None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_swiglu_bwd(g_ptr, u_ptr, h_ptr, s_ptr, dg_ptr, du_ptr, part_ptr, rows, cols, rows_per_block,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < cols
        s = tl.load(s_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)  # reduced over rows once, after the loop
        first = tl.program_id(1) * rows_per_block
        last = tl.minimum(first + rows_per_block, rows)
        for t0 in range(first, last, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = (t < last)[:, None] & c_ok[None, :]
            at = t.to(tl.int64)[:, None] * cols + c[None, :]
            g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            a = g * sig
            acc += h * a * u
            hs = h * s[None, :]
            tl.store(du_ptr + at, (hs * a).to(du_ptr.dtype.element_ty), mask=ok)
            tl.store(dg_ptr + at, (hs * u * sig * (1 + g * (1 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * cols + c, tl.sum(acc, 0), mask=c_ok)

    return scaled_swiglu_bwd


_KERNEL = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid(rows: int, cols: int) -> tuple[int, int, int]:
    """(column blocks, row blocks, rows per row block): ~_TARGET_PROGRAMS programs, whole BLOCK_T steps each."""
    col_blocks = _cdiv(cols, _BLOCK_C)
    want = max(1, min(_cdiv(rows, _BLOCK_T), _TARGET_PROGRAMS // col_blocks))
    per = _cdiv(_cdiv(rows, want), _BLOCK_T) * _BLOCK_T
    return col_blocks, _cdiv(rows, per), per


@torch.library.triton_op("peftlab::scaled_swiglu_backward", mutates_args=())
def _backward_op(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    rows, cols = gate.shape
    col_blocks, row_blocks, per = _grid(rows, cols)
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    part = torch.empty((row_blocks, cols), dtype=torch.float32, device=gate.device)
    torch.library.wrap_triton(_KERNEL)[(col_blocks, row_blocks)](
        gate, up, grad, scale, dg, du, part, rows, cols, per, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C)
    return dg, du, part.sum(0)


def scaled_swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scaled_swiglu_backward_reference``'s contract, by the Triton kernel where ``kernel_usable``."""
    if not kernel_usable(gate) or gate.numel() == 0:
        return scaled_swiglu_backward_reference(gate, up, grad, scale)
    cols = gate.shape[-1]
    flat = [t.reshape(-1, cols).contiguous() for t in (gate, up, grad)]
    dg, du, ds = _backward_op(*flat, scale.reshape(cols).contiguous())
    return dg.view(gate.shape), du.view(up.shape), ds


class _ScaledSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, scale):
        ctx.save_for_backward(gate, up, scale)
        return scaled_swiglu_reference(gate, up, scale)

    @staticmethod
    def backward(ctx, grad):
        gate, up, scale = ctx.saved_tensors
        dg, du, ds = scaled_swiglu_backward(gate, up, grad, scale)
        return dg, du, ds.reshape(scale.shape).to(scale.dtype)


def scaled_swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or scale.shape != gate.shape[-1:]:
        raise ValueError(f"scaled_swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must agree and scale "
                         f"{tuple(scale.shape)} must be ({gate.shape[-1]},)")
    return _ScaledSwiGLU.apply(gate, up, scale)


def use_scaled_swiglu(model: nn.Module) -> list[nn.Module]:
    """Route the model's SiLU-gated MLPs whose down projection is an adapted module through the node (decided at each
    call: on the fast path, when the down projection's adaptation is a vector on its input); returns the MLPs changed.
    MLPs whose forward is already replaced on the instance (the lean nodes, ``ops/lean.py``) are left alone."""
    from peftlab.core.adapter import AdaptedModule
    from peftlab.ops.lean import is_swiglu_mlp

    changed = []
    for module in model.modules():
        if is_swiglu_mlp(module) and "forward" not in module.__dict__ \
                and isinstance(module.down_proj, AdaptedModule):
            module.forward = _mlp_forward(module)
            changed.append(module)
    return changed


@contextlib.contextmanager
def scaled_swiglu_mlps(model: nn.Module, device: torch.device | None = None) -> Iterator[int]:
    """``use_scaled_swiglu`` for the duration of the block (the number of MLPs changed); their own forward after.
    With ``device`` (the trainer's steps): only when asked (``PEFTLAB_SCALED_SWIGLU=1``: off by default, it measured
    slower, see the module doc) and where the fast path is on for it (``fast.enabled``); else nothing changes: 0."""
    on = device is None or (os.environ.get("PEFTLAB_SCALED_SWIGLU") == "1"
                            and fast.enabled(torch.empty(0, device=device)))
    changed = use_scaled_swiglu(model) if on else []
    try:
        yield len(changed)
    finally:
        for module in changed:
            if getattr(module.__dict__.get("forward"), "scaled_swiglu", False):
                del module.forward


def _mlp_forward(m: nn.Module):
    def forward(x):
        gate, up = m.gate_proj(x), m.up_proj(x)
        down = m.down_proj
        input_scale = getattr(down, "input_scale", None)  # gone after the adapters are detached
        scale = input_scale() if input_scale is not None and fast.enabled(gate) else None
        if scale is None or scale.shape != gate.shape[-1:]:
            return down(m.act_fn(gate) * up)
        return down.base_layer(scaled_swiglu(gate, up, scale))
    forward.scaled_swiglu = True
    return forward
