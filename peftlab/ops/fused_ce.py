"""Fused output projection + cross-entropy that never holds the full (tokens, vocab) logits.

    loss = sum_t CE(h_t W^T (+ b), y_t) / N,     N = number of targets != ignore_index

The tokens are processed in chunks of ``chunk_size`` rows: each chunk's logits are computed in fp32,
reduced to its loss and, in the same pass, to the gradient of the loss with respect to those logits
(softmax - onehot), which is immediately turned into the chunk's grad for ``h`` and accumulated into
the grad for ``W``. Backward then only rescales the stored gradients by the incoming grad. Peak extra
memory is one chunk's logits (chunk x vocab fp32) instead of tokens x vocab in the model dtype plus
its fp32 upcast and its gradient.

``fused_linear_cross_entropy_reference`` is the plain materializing form; tests hold the two equal.
For causal LM training use ``causal_lm_loss`` (shifts labels by one as transformers does).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from peftlab.ops.ce_rows import ce_rows

IGNORE_INDEX = -100


def _check(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 1:
        raise ValueError(f"expected hidden (N, H), weight (V, H), target (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(target.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != target.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"target {tuple(target.shape)}")


def _rows_chunk(h, t, grad_h, weight, denom, ignore_index) -> torch.Tensor:
    """The row kernel's path (frozen head, no bias): logits stay in the GEMM's dtype and the gradient is written
    over them (no fp32 copy); its grad for ``h`` goes into ``grad_h``. Returns the chunk's summed loss."""
    logits = h @ weight.t().to(h.dtype)
    loss = ce_rows(logits, t, 1.0 / denom, ignore_index).sum()
    if grad_h is not None:
        grad_h.copy_(logits.to(weight.dtype) @ weight)
    return loss


def _float_chunk(h, t, grad_h, weight, denom, ignore_index, bias, grad_w, grad_b) -> torch.Tensor:
    """The fp32 path (a trained head or a bias): the chunk's loss, and its gradients accumulated where asked."""
    logits = (h @ weight.t().to(h.dtype)).float()
    if bias is not None:
        logits += bias.float()
    ok = t != ignore_index
    safe_t = torch.where(ok, t, torch.zeros_like(t))
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * ok).sum()
    if grad_h is None and grad_w is None and grad_b is None:
        return loss
    # d loss / d logits = (softmax - onehot) / N on valid rows, 0 on ignored rows
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
    grad_logits *= (ok.float() / denom)[:, None]
    if grad_h is not None:  # in the weight's dtype: no float32 copy of a (vocab, hidden) head
        grad_h.copy_(grad_logits.to(weight.dtype) @ weight)
    if grad_w is not None:
        grad_w.addmm_(grad_logits.t(), h.float())
    if grad_b is not None:
        grad_b += grad_logits.sum(0)
    return loss


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index: int, chunk_size: int, grads: bool):
        n_tokens = hidden.shape[0]
        # a device tensor, not int(): reading the count would stall the host mid-step until the GPU drained
        denom = (target != ignore_index).sum().clamp_min(1).float()
        want_h, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        want_b = grads and bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # a chunk's loss from its rows, targets and slice of the input's gradient; the rest is bound here
        if not (want_w or want_b) and bias is None:
            chunk_loss = functools.partial(_rows_chunk, weight=weight, denom=denom, ignore_index=ignore_index)
        else:
            chunk_loss = functools.partial(_float_chunk, weight=weight, denom=denom, ignore_index=ignore_index,
                                           bias=bias, grad_w=grad_w, grad_b=grad_b)
        for start in range(0, n_tokens, chunk_size):
            # one call a chunk: its logits die on return, before the next chunk's product is allocated (a loop body
            # holding them kept two chunks alive at the peak, 2 x 128 MiB at the 1B shape)
            rows = slice(start, start + chunk_size)
            total += chunk_loss(hidden[rows], target[rows], grad_h[rows] if want_h else None)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        gh = (grad_h * scale.to(grad_h.dtype)) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        gb = (grad_b * scale).to(ctx.bias_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


def auto_chunk_size(vocab: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that one chunk's float32 logits take about ``budget_bytes`` (at least 64), rounded down to a
    multiple of 256 rows when there are more (``PEFTLAB_CE_CHUNK_ALIGN``, 1: none): the GEMMs' row tiles are 128 or
    256 rows, so 523 rows (the 1B vocabulary's 256 MiB) computed 640-768. Not yet timed on a GPU; the A/B of 64 MiB
    chunks (131 rows, about two row tiles of which one is nearly empty) cost 6.7-8.4 ms a step. None: 256 MiB,
    or ``PEFTLAB_CE_CHUNK_MIB`` (an A/B knob: the row kernel's path keeps the chunk in the GEMM's dtype, so bf16 logits
    take half the budget; Liger's chunks hold ~32 MiB of logits at the 1B shape against our 128)."""
    if budget_bytes is None:
        budget_bytes = int(float(os.environ.get("PEFTLAB_CE_CHUNK_MIB", "256")) * 2**20)
    rows = budget_bytes // (4 * vocab)
    align = int(os.environ.get("PEFTLAB_CE_CHUNK_ALIGN", "256"))
    return max(64, rows - rows % align if rows >= align else rows)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                               chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target`` over non-ignored rows.

    hidden (N, H), weight (V, H), target (N,) int64. Gradients flow to hidden, and to weight / bias
    when they require grad. All rows ignored: returns 0 (with zero gradients), not NaN.
    ``chunk_size`` None: about 256 MiB of float32 logits per chunk.
    """
    _check(hidden, weight, target)
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # the gradients are computed in the forward pass: only when autograd will ask for them
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _FusedLinearCE.apply(hidden, weight, bias, target, ignore_index, chunk_size, grads)


def fused_linear_cross_entropy_reference(hidden, weight, target, bias=None, ignore_index: int = IGNORE_INDEX):
    """The plain form: full logits in fp32, then F.cross_entropy (mean over non-ignored rows)."""
    _check(hidden, weight, target)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if bool((target != ignore_index).any()):
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    return logits.sum() * 0.0


def shift_for_causal_lm(hidden: torch.Tensor, labels: torch.Tensor,
                        virtual: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H), (B, T) with S = ``virtual`` + T (prompt tuning's virtual tokens come first) -> every position as
    (B*S, H) rows and their (B*S,) next-token targets: position ``virtual`` + i predicts labels[:, i + 1]; the last
    position and the virtual ones predict nothing (``IGNORE_INDEX``). The rows are a view of a contiguous ``hidden``:
    no copy of the hidden states (dropping the positions instead copied them, 16 MiB at the 1B shape, and its
    backward scattered the gradient into a zeroed full-size one)."""
    b, s = hidden.shape[:2]
    if labels.dim() != 2 or (b, s) != (labels.shape[0], labels.shape[1] + virtual):
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (batch, time)"
                         + (f" with {virtual} virtual tokens first" if virtual else ""))
    target = torch.full((b, s), IGNORE_INDEX, dtype=labels.dtype, device=hidden.device)
    target[:, virtual:s - 1] = labels[:, 1:]
    return hidden.reshape(b * s, hidden.shape[-1]), target.reshape(-1)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None = None, chunk_size: int | None = None, virtual: int = 0) -> torch.Tensor:
    """Next-token loss as transformers computes it (labels shifted left by one, -100 ignored), fused. ``virtual``:
    leading positions of ``hidden`` that have no label (prompt tuning's virtual tokens)."""
    h, t = shift_for_causal_lm(hidden, labels, virtual)
    return fused_linear_cross_entropy(h, weight, t, bias=bias, chunk_size=chunk_size)
