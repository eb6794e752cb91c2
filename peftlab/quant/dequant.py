"""bitsandbytes 4-bit dequantization written as plain torch operators, for compiled code.

bitsandbytes stores a 4-bit weight of n = out * in elements as n/2 bytes, two codes per byte (the high nibble
first, in the (out, in) row-major order), and one absmax per ``blocksize`` elements:

    w[i] = code[q[i]] * absmax[i // blocksize]                         (float32, then cast to the compute dtype)

With double quantization ("nested") the absmax are themselves 8-bit codes of a second, blockwise state:

    absmax[j] = code2[qa[j]] * absmax2[j // blocksize2] + offset        (float32)

Its own ``dequantize_4bit`` runs that as two or three kernels (the nested absmax, the offset, the weights), each a
custom operator whose CUDA implementation is Python around a ctypes call: ~100 us of host time per weight on the
H200, and the 8B QLoRA step dequantizes 669 times eager, 448 compiled (forward, recomputation, backward;
profiles in bench/README.md, tenth session). Inside a ``torch.compile`` region the function below is instead a
table lookup and a broadcast product that inductor fuses into one kernel with no Python at run time.
``dequantize_weight`` (peftlab/quant/bnb.py) takes it only while compiling (``PEFTLAB_TORCH_DEQUANT=0`` keeps
bitsandbytes' there too, for side-by-side benchmarks); eager code keeps bitsandbytes' kernels. Both compute each
product in float32 in the same order; tests compare them bit for bit on the CPU (eager, aot_eager, inductor); on
CUDA inductor may fuse the nested absmax's multiply-add into one FMA (one rounding instead of two), so its test
allows a rare one-step difference.

Found on the way: bitsandbytes 0.50's CPU kernel is wrong for rows that are not whole blocks (in_features not a
multiple of the blocksize): it restarts the block count at every row, so with in_features 32 every row reads block
0's absmax. Its CUDA kernel and its own torch reference index the flat weight, as here. Eager CPU code (the tests'
tiny models) goes through bitsandbytes' kernel, forward and ``dequantize_weight`` alike, so the two agree there;
a test compares rows that are not whole blocks against bitsandbytes' torch reference.
"""
from __future__ import annotations

import os

import torch


def torch_form_enabled() -> bool:
    """``PEFTLAB_TORCH_DEQUANT`` (default on; "0" off), read when the code is compiled."""
    return os.environ.get("PEFTLAB_TORCH_DEQUANT", "1") != "0"


def fusable(quant_state) -> bool:
    """Whether ``dequantize_4bit_torch`` covers this state: an even number of weights (whole bytes), a code table
    and, when nested, a blockwise second state."""
    shape = getattr(quant_state, "shape", None)
    if shape is None or getattr(quant_state, "code", None) is None or quant_state.quant_type not in ("nf4", "fp4"):
        return False
    n = 1
    for size in shape:
        n *= int(size)
    if n % 2:
        return False
    return not quant_state.nested or getattr(quant_state.state2, "code", None) is not None


def _blockwise(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """table[codes[i]] * scales[i // blocksize], float32: a table lookup times a broadcast scale per block (one
    fused loop when compiled). A last, partial block is padded with code 0 and cut off again."""
    n = codes.numel()
    short = -n % blocksize
    if short:
        codes = torch.cat([codes, codes.new_zeros(short)])
    values = table.float()[codes.long()].view(-1, blocksize) * scales.float().view(-1, 1)
    return values.reshape(-1)[:n]


def nested_absmax(quant_state) -> torch.Tensor:
    """The float32 absmax of a double-quantized state (its plain absmax otherwise)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    second = quant_state.state2
    return _blockwise(quant_state.absmax.reshape(-1), second.code, second.absmax, second.blocksize) + \
        quant_state.offset.float()


def dequantize_4bit_torch(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of bitsandbytes' 4-bit storage ``packed`` (any storage dtype, viewed as bytes) with its
    ``quant_state``, shaped ``quant_state.shape`` in ``dtype`` (default ``quant_state.dtype``); equal to
    ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``. Needs ``fusable(quant_state)``."""
    if not fusable(quant_state):
        raise ValueError(f"dequantize_4bit_torch: state of shape {tuple(quant_state.shape)}, blocksize "
                         f"{quant_state.blocksize}, type {quant_state.quant_type!r} is not covered; use bitsandbytes'")
    pairs = packed.reshape(-1).view(torch.uint8)
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=pairs.device)  # high nibble first
    codes = ((pairs[:, None] >> shifts) & 15).reshape(-1)  # a broadcast, not a stack: no separate copy kernel
    dense = _blockwise(codes, quant_state.code, nested_absmax(quant_state), quant_state.blocksize)
    return dense.reshape(quant_state.shape).to(dtype or quant_state.dtype)
