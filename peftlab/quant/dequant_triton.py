"""bitsandbytes 4-bit dequantization in one Triton kernel, for eager code on the GPU.

The same arithmetic as ``dequant.py`` (its docstring gives the storage layout): each program unpacks a run of
bytes, looks up the two codes, computes the block's absmax (from the nested 8-bit state when double-quantized) and
writes both weights in the compute dtype. bitsandbytes' own eager path is two or three kernels per weight, each
launched from Python around a ctypes call (~100 us of host time per weight on the H200, and the eager 8B QLoRA step
dequantizes 669 times, bench/README.md, tenth session): one launch replaces them. Compiled code takes the torch form
instead (inductor generates the same single kernel).

The kernel is compiled without floating-point contraction, so the nested absmax is rounded after its multiply and
again after the offset, as bitsandbytes does; tests compare it with the torch form (and so with bitsandbytes) bit for
bit, in Triton's interpreter on the CPU (float32 and float16 outputs; the interpreter truncates to bfloat16 where the
GPU rounds to nearest even, so there bf16 is checked against the truncated float32 result, and on the GPU against
bitsandbytes). ``kernel_usable``: CUDA tensors with Triton present; CPU tensors only when
asked (``PEFTLAB_DEQUANT_KERNEL=1``) under ``TRITON_INTERPRET=1``; ``PEFTLAB_DEQUANT_KERNEL=0`` turns it off.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from peftlab.quant.dequant import fusable

_BLOCK = 1024  # bytes per program: 2048 weights


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize(packed, code, absmax, code2, absmax2, offset, out, n_bytes,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = at < n_bytes
        pair = tl.load(packed + at, mask=ok, other=0).to(tl.int32)
        block = (2 * at) // BLOCKSIZE  # both weights of a byte share a block (the blocksize is even)
        if NESTED:
            q = tl.load(absmax + block, mask=ok, other=0).to(tl.int32)
            scale = tl.load(code2 + q, mask=ok, other=0.0) * tl.load(absmax2 + block // BLOCKSIZE2, mask=ok, other=0.0)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=ok, other=0.0)
        high = tl.load(code + (pair >> 4), mask=ok, other=0.0) * scale
        low = tl.load(code + (pair & 15), mask=ok, other=0.0) * scale
        kind = out.dtype.element_ty
        tl.store(out + 2 * at, high.to(kind), mask=ok)
        tl.store(out + 2 * at + 1, low.to(kind), mask=ok)

    return dequantize


_COMPILED = None


_FAILED: str | None = None  # why the kernel failed once (then bitsandbytes' kernels for the rest of the process)


def kernel_usable(packed: torch.Tensor) -> bool:
    """Whether the kernel runs for this storage (see the module doc)."""
    flag = os.environ.get("PEFTLAB_DEQUANT_KERNEL", "")
    if flag == "0" or _FAILED is not None:
        return False
    if not (packed.is_cuda or (flag == "1" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return importlib.util.find_spec("triton") is not None


def dequantize_or_none(packed: torch.Tensor, quant_state) -> torch.Tensor | None:
    """``dequantize_4bit_triton``, or None (with one warning naming the error) if the kernel cannot be built or
    launched here, so the caller falls back to bitsandbytes' kernels instead of failing a training run."""
    global _FAILED
    try:
        return dequantize_4bit_triton(packed, quant_state)
    except Exception as exc:  # a Triton or driver version without what the kernel needs
        _FAILED = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"peftlab's Triton 4-bit dequantization failed ({_FAILED}); using bitsandbytes' kernels",
                      RuntimeWarning, stacklevel=2)
        return None


def dequantize_4bit_triton(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequant.dequantize_4bit_torch``'s contract in one kernel launch. Needs ``fusable(quant_state)``."""
    if not fusable(quant_state):
        raise ValueError(f"dequantize_4bit_triton: state of shape {tuple(quant_state.shape)}, type "
                         f"{quant_state.quant_type!r} is not covered; use bitsandbytes'")
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    pairs = packed.reshape(-1).view(torch.uint8)
    out = torch.empty(quant_state.shape, dtype=dtype or quant_state.dtype, device=pairs.device)
    nested = bool(quant_state.nested)
    second = quant_state.state2 if nested else None
    code = quant_state.code.float()
    absmax = quant_state.absmax if nested else quant_state.absmax.float()
    code2 = second.code.float() if nested else code
    absmax2 = second.absmax.float() if nested else code
    offset = quant_state.offset.float().reshape(1) if nested else code
    grid = (-(-pairs.numel() // _BLOCK),)
    _COMPILED[grid](pairs, code, absmax, code2, absmax2, offset, out, pairs.numel(),
                    BLOCKSIZE=quant_state.blocksize, BLOCKSIZE2=second.blocksize if nested else 1, NESTED=nested,
                    BLOCK=_BLOCK, enable_fp_fusion=False)
    return out
