"""Cross-entropy of a chunk of logits rows and its gradient, in one pass each way, written over the logits.

    loss_i = (logsumexp(z_i) - z_i[t_i]) * ok_i,      grad_i = (softmax(z_i) - onehot(t_i)) * ok_i * scale

with ok_i = (t_i != ignore_index) and ``scale`` a device scalar (1 / number of targets, so the host never reads
it). The fused linear + cross-entropy (``fused_ce.py``) calls this on each chunk of logits it computes. The plain
form, ``ce_rows_reference``, takes about eight passes over fp32 logits (upcast, max, exp, sum, subtract, exp again,
the one-hot subtraction, the row scale, the cast back); the Triton kernel reads the logits twice in their own dtype
and writes the gradient once, in place: on a 128k vocabulary that is most of the loss's time. Both compute in fp32
from the same logits and round the gradient to the logits' dtype once.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_BLOCK = 2048


def ce_rows_reference(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """Per-row losses (fp32, 0 on ignored rows); ``logits`` (rows, vocab) is overwritten by the gradient."""
    z = logits.float()
    ok = target != ignore_index
    safe = torch.where(ok, target, torch.zeros_like(target))
    lse = torch.logsumexp(z, dim=-1)
    loss = (lse - z.gather(1, safe[:, None]).squeeze(1)) * ok
    grad = z.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(target), device=target.device), safe] -= 1.0
    grad *= (ok.float() * scale.float())[:, None]
    logits.copy_(grad)
    return loss


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows_kernel(z_ptr, t_ptr, scale_ptr, loss_ptr, vocab, stride, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = z_ptr + row.to(tl.int64) * stride
        t = tl.load(t_ptr + row)
        ok = t != ignore_index
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, vocab, BLOCK):  # running max and sum of exp, per lane
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
            m = m_new
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        t_safe = tl.where(ok, t, 0)
        picked = tl.load(base + t_safe, mask=(t_safe >= 0) & (t_safe < vocab), other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(ok, lse - picked, 0.0))
        w = tl.where(ok, tl.load(scale_ptr).to(tl.float32), 0.0)
        for start in range(0, vocab, BLOCK):  # the gradient, over the logits
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == t_safe, 1.0, 0.0)) * w
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=inside)

    return ce_rows_kernel


_COMPILED = None


def kernel_usable(logits: torch.Tensor) -> bool:
    """The Triton kernel runs for CUDA logits when Triton imports (``PEFTLAB_CE_KERNEL=0`` turns it off); for CPU
    logits only when asked (``PEFTLAB_CE_KERNEL=1``) under ``TRITON_INTERPRET=1``, as the tests do: the interpreter
    is far too slow for training."""
    flag = os.environ.get("PEFTLAB_CE_KERNEL", "")
    if flag == "0" or not (logits.is_cuda or (flag == "1" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return importlib.util.find_spec("triton") is not None


def ce_rows(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``ce_rows_reference``'s contract, by the Triton kernel where ``kernel_usable``, else by the reference."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (rows, vocab) and target (rows,), got {tuple(logits.shape)}, "
                         f"{tuple(target.shape)}")
    if not kernel_usable(logits) or logits.stride(1) != 1:
        return ce_rows_reference(logits, target, scale, ignore_index)
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _COMPILED[(logits.shape[0],)](logits, target.contiguous(), scale.reshape(1).float(), loss, logits.shape[1],
                                      logits.stride(0), ignore_index, BLOCK=_BLOCK)
    return loss
