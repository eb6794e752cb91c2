"""Fused LoRA and DoRA linear layers: one autograd node per adapted module, adapter maths in the
activation dtype, and only what backward needs saved.

    LoRA   y = W0 x + b + s B (A xd)                       (xd = dropout(x); xd = x without dropout)
    DoRA   y = (m / n) ⊙ (W0 x + s B (A x)) + b,   n = ||W0 + s B A||_row  (detached, as the paper says)

Forward is one GEMM for the base and two thin ones (shrink to rank r, expand added in place into the
base output), so the (tokens, out) adapter result is never a separate tensor. Backward, with g the
output gradient (gs = g ⊙ m/n for DoRA):

    dx = gs W0 + (s gs B) A        dA = (s gs B)^T xd      dB = gs^T (s A xd)
    dm = Σ_tokens g ⊙ (y - b) / m    (DoRA: z = (y - b) n / m, so Σ g ⊙ z / n = Σ g ⊙ (y - b) / m)

Saved for backward: the input (already held by whoever produced it), the rank-r activation s A xd (A xd and
the vector where a per-rank vector d scales it: VeRA, PVeRA, Tied-LoRA),
and for DoRA one bf16 copy of the output y instead of autograd's W0 x (bf16) and s B A x (fp32) and
their products. ``PEFTLAB_DORA_SHARE_OUTPUT=1`` keeps the output itself rather than a copy (free where
the next op holds it anyway: gate/up feed SiLU-mul, v feeds attention); it is off by default because
some fused kernels write gradients into the tensors they saved (Liger's and Unsloth's SwiGLU backward
overwrite their inputs, here the gate/up outputs), which would corrupt dm silently. The frozen base weight's gradient is computed only when
it requires grad; the base bias likewise. Adapter weights (fp32) are cast to the activation dtype once
per call; their gradients come back in their own dtype.

Used by ``AdaptedModule`` through ``AdapterLayer.fused_forward`` when ``enabled(x)``: on CUDA by default,
off elsewhere; ``PEFTLAB_FAST=0`` turns it off, ``PEFTLAB_FAST=1`` on (also on CPU, for tests). The plain
methods (``LoraLayer.delta``, ``DoraLayer.adapt``) stay the reference; tests compare the two.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import BaseView
from peftlab.ops.mm_add import mm_add


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused path is on for an input on this device (``PEFTLAB_FAST`` overrides)."""
    flag = os.environ.get("PEFTLAB_FAST", "")
    return x.is_cuda if flag == "" else flag != "0"


def dropout_live(dropout: nn.Module) -> bool:
    """Whether an adapter's dropout (``nn.Dropout``, or ``nn.Identity`` for p = 0) drops anything now: a fused node
    that cannot apply it to its own input stands aside then."""
    return not isinstance(dropout, nn.Identity) and dropout.training


def operands(x: torch.Tensor, base: BaseView) -> tuple | None:
    """(x, weight (out, in), bias) for a fused node, or None when the fused path does not apply.

    It applies when enabled, to a plain floating-point linear weight in x's dtype, or under autocast,
    where all three are cast to the autocast dtype as ``F.linear`` would, and to a quantized base whose codec
    multiplies by dequantizing (``dense_for_matmul``: bitsandbytes 4-bit), as a ``QuantizedWeight``. Other
    quantized weights (8-bit), distributed tensors and mixed dtypes without autocast use the reference path.
    """
    if not enabled(x) or base.kind != "linear":
        return None
    autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    bias = base.bias
    if base.codec is not None and base.codec.dense_for_matmul(base.module):
        # dequantized inside the node; in the autocast dtype, else the layer's compute dtype as bitsandbytes' own
        # forward does (the output goes back to the input's dtype through ``restore_dtype``)
        weight, dtype = QuantizedWeight(base), autocast or getattr(base.module, "compute_dtype", None) or x.dtype
    else:
        w = base.weight
        if type(w.data) is not torch.Tensor or not w.dtype.is_floating_point:
            return None
        if autocast is None:
            return (x, base.weight_oi(), bias) if w.dtype == x.dtype else None
        weight, dtype = base.weight_oi().to(autocast), autocast
    return _as(x, dtype), weight, None if bias is None else _as(bias, dtype)


class QuantizedWeight:
    """A frozen quantized base weight that a fused node dequantizes when it needs it (forward, and backward for the
    input gradient) and never keeps: the saved state stays the packed 4-bit storage. ``first``: a dense copy the
    caller already made this step (DoRA's norm needs W0), used by the first ``dense`` call and then dropped."""

    requires_grad = False

    def __init__(self, base: BaseView):
        self.base = base
        self.first: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.first is not None:
            dense, self.first = self.first, None
            return _as(dense, dtype)
        return _as(self.base.weight_oi(), dtype)


def restore_dtype(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A fused node's output in the dtype the caller's input had (outside autocast; under autocast the node's
    dtype is what F.linear would have given)."""
    if out.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return out
    return out.to(x.dtype)


def _dense(weight, dtype: torch.dtype) -> torch.Tensor:
    return weight.dense(dtype) if isinstance(weight, QuantizedWeight) else _as(weight, dtype)


def _as(t: torch.Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
    """``t.to(dtype)`` or ``t.to(device)``, without the dispatcher round trip when it already is (host time: ten
    per layer a step)."""
    if dtype is not None:
        return t if t.dtype == dtype else t.to(dtype)
    return t if t.device == device else t.to(device)


def _save(ctx, weight, *tensors) -> None:
    """save_for_backward, with a QuantizedWeight kept on ctx (it is no tensor) and None in its place."""
    ctx.quantized = weight if isinstance(weight, QuantizedWeight) else None
    ctx.save_for_backward(None if ctx.quantized is not None else weight, *tensors)


def _saved(ctx) -> tuple:
    weight, *rest = ctx.saved_tensors
    return (ctx.quantized if ctx.quantized is not None else weight, *rest)


def compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    """The dtype an adapter's activation maths runs in: the activation's on the fast path (bf16 GEMMs
    on a bf16 model, no fp32 copies of activations kept for backward), else the adapter's own."""
    return x.dtype if x.dtype.is_floating_point and enabled(x) else param.dtype


def no_autocast(x: torch.Tensor):
    """Autocast off inside a fused node (its operands are already in the compute dtype); entering a
    context costs host time on every module, so only when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _fold_tensor_scaling(a: torch.Tensor, scaling) -> tuple[torch.Tensor, float]:
    """A 0-d tensor scaling (hot-swap's buffer) goes into A: reading it as a float would sync the device
    and make torch.compile specialise on its value."""
    if isinstance(scaling, torch.Tensor):
        return a * scaling.to(a.dtype), 1.0
    return a, scaling


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, mid, scaling):
        src = x if xd is None else xd
        x2, s2 = _flat(x), _flat(src)
        a_, b_ = _as(a, x.dtype), _as(b, x.dtype)  # kept for backward: no second cast there
        mid_ = None if mid is None else _as(mid, x.dtype)
        u = s2 @ a_.t()  # with a per-rank vector (VeRA's d), A x is kept: d's gradient is Σ u ⊙ (s g B)
        xa = u.mul_(scaling) if mid is None else u * (mid_ * scaling)
        out = mm_add(x2, _dense(weight, x.dtype), bias, xa, b_, True, True)
        ctx.scaling, ctx.has_dropout = scaling, xd is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.mid_dtype = None if mid is None else mid.dtype
        _save(ctx, weight, x2 if weight.requires_grad else None, s2, a_, b_, xa if mid is None else u, mid_)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, x2, s2, a, b, kept, mid = _saved(ctx)
        g2 = _flat(grad)
        a_, b_ = _as(a, g2.dtype), _as(b, g2.dtype)
        gxa = (g2 @ b_).mul_(ctx.scaling)  # the gradient of A x's scaled image: of u ⊙ d with a per-rank vector
        grad_mid = None
        if mid is None:
            xa = kept
        else:
            if ctx.needs_input_grad[6]:
                grad_mid = (gxa.float() * kept.float()).sum(0).to(ctx.mid_dtype)
            xa, gxa = kept * (mid * ctx.scaling), gxa * mid
        lead = grad.shape[:-1]
        grad_x = grad_xd = grad_w = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            w = _dense(weight, g2.dtype)
            grad_x = g2 @ w if ctx.has_dropout else mm_add(g2, w, None, gxa, a_, False, False)
            grad_x = grad_x.view(*lead, -1)
        if ctx.has_dropout and ctx.needs_input_grad[1]:
            grad_xd = (gxa @ a_).view(*lead, -1)
        if ctx.needs_input_grad[2]:
            grad_w = _as(g2.t() @ x2, weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if ctx.needs_input_grad[4]:
            grad_a = _as(gxa.t() @ s2, ctx.a_dtype)
        if ctx.needs_input_grad[5]:
            grad_b = _as(g2.t() @ xa, ctx.b_dtype)
        return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_b, grad_mid, None


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, magnitude, norm, scaling, share_output):
        x2 = _flat(x)
        scale = (magnitude / norm).to(x.dtype)
        a_, b_ = _as(a, x.dtype), _as(b, x.dtype)  # kept for backward: no second cast there
        xa = (x2 @ a_.t()).mul_(scaling)
        z = mm_add(x2, _dense(weight, x.dtype), None, xa, b_, True, True)
        y = z.mul_(scale) if bias is None else torch.addcmul(bias.to(x.dtype), z, scale)
        y = y.view(*x.shape[:-1], y.shape[-1])
        ctx.scaling = scaling
        kept = None
        if ctx.needs_input_grad[5]:  # dm needs the output; a copy unless the caller vouches for sharing it
            kept = y if share_output else y.clone()
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        _save(ctx, weight, x2, bias, a_, b_, magnitude, scale, xa, kept)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, x2, bias, a, b, magnitude, scale, xa, y = _saved(ctx)
        g2 = _flat(grad)
        gs = g2 * scale
        a_, b_ = _as(a, g2.dtype), _as(b, g2.dtype)
        gxa = (gs @ b_).mul_(ctx.scaling)
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = mm_add(gs, _dense(weight, g2.dtype), None, gxa, a_, False, False).view(*grad.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            grad_w = _as(gs.t() @ x2, weight.dtype)
        if ctx.needs_input_grad[2] or (bias is not None and ctx.needs_input_grad[5]):
            g_sum = g2.sum(0, dtype=torch.float32)
            if ctx.needs_input_grad[2]:
                grad_bias = g_sum.to(bias.dtype)
        if ctx.needs_input_grad[3]:
            grad_a = _as(gxa.t() @ x2, ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = _as(gs.t() @ xa, ctx.b_dtype)
        if ctx.needs_input_grad[5]:
            gy = (g2 * _flat(y)).sum(0, dtype=torch.float32)
            if bias is not None:
                gy = gy - bias.float() * g_sum
            grad_m = (gy / magnitude.float()).to(magnitude.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None


def lora_linear(x: torch.Tensor, xd: torch.Tensor | None, weight_oi: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float, mid: torch.Tensor | None = None) -> torch.Tensor:
    """W0 x + bias + scaling * B (mid ⊙ A xd), one autograd node; ``xd`` None means no dropout (xd = x), ``mid``
    None no per-rank vector."""
    a, scaling = _fold_tensor_scaling(a, scaling)
    with no_autocast(x):
        return _LoraLinear.apply(x, xd, weight_oi, bias, a, b, mid, float(scaling))


def lowrank(x: torch.Tensor, base: BaseView, a: torch.Tensor, b: torch.Tensor, scaling: float,
            dropout: nn.Module, mid: torch.Tensor | None = None) -> torch.Tensor | None:
    """The fused W0 x + bias + s B (mid ⊙ A dropout(x)) for any low-rank method that can state its effective
    A (r, in) and B (out, r) (LoRA, AdaLoRA, ...), or None when the fused path does not apply. Gradients reach the
    method's own parameters through whatever built ``a``, ``b`` and ``mid``."""
    parts = operands(x, base)
    if parts is None:
        return None
    xc, weight, bias = parts
    xd = dropout(xc) if dropout_live(dropout) else None
    return restore_dtype(lora_linear(xc, xd, weight, bias, _as(a, device=x.device), _as(b, device=x.device),
                                     scaling, None if mid is None else _as(mid, device=x.device)), x)


def scaled_lowrank(x: torch.Tensor, base: BaseView, a: torch.Tensor, b: torch.Tensor, d_vec: torch.Tensor,
                   b_vec: torch.Tensor, scaling: float, dropout: nn.Module) -> torch.Tensor | None:
    """``lowrank`` for diag(b_vec) B diag(d_vec) A (VeRA, PVeRA, Tied-LoRA; ``ops/scaled_lowrank.py``): d_vec goes
    in as the per-rank vector rather than folded into A, so with A frozen (VeRA) the backward skips A's gradient
    product (rank x tokens x in) and reads d_vec's from the rank-r activations it has."""
    return lowrank(x, base, a, b_vec[:, None] * _as(b, device=x.device), scaling, dropout, mid=d_vec)


def dora_linear(x: torch.Tensor, weight_oi: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float) -> torch.Tensor:
    """(magnitude / norm) ⊙ (W0 x + scaling * B A x) + bias, one autograd node; ``norm`` gets no gradient."""
    share = os.environ.get("PEFTLAB_DORA_SHARE_OUTPUT", "") == "1"
    a, scaling = _fold_tensor_scaling(a, scaling)
    with no_autocast(x):
        return _DoraLinear.apply(x, weight_oi, bias, a, b, magnitude, norm.detach(), float(scaling), share)


def dense_update(x: torch.Tensor, base: BaseView, delta_oi: torch.Tensor) -> torch.Tensor | None:
    """The fused (W0 + ΔW) x + bias for methods whose update is a dense (out, in) ``delta_oi`` built each forward
    (FourierFT, SHiRA, WaveFT; HiRA, MiSS "bat" and GLoRA, whose ΔW reads W0; FRoD; Super-Tuning's sparse part), or
    None when the fused path does not apply. One GEMM forward and two backward (input gradient, ΔW's gradient)
    instead of five with W0 x and ΔW x apart; it keeps W0 + ΔW for backward where the reference keeps ΔW, the same
    size. A 4-bit base is dequantized once for the sum."""
    parts = operands(x, base)
    if parts is None:
        return None
    xc, weight, bias = parts
    with no_autocast(x):
        out = F.linear(xc, _dense(weight, xc.dtype) + _as(_as(delta_oi, device=x.device), xc.dtype), bias)
    return restore_dtype(out, x)
