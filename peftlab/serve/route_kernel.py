"""One Triton launch between the row kernels' shrink and expand of a routed (MoLoRA) table in the fixed-shape step:
each token's router logits and rank activations from the shrink's partial sums, its top-k softmax gates, and the
gated rank activations the expand reads. In torch the same maths (``mixture_gates``: a sort, masks, a softmax, a
scatter, then the product) is about fifteen small kernels per adapted linear, and a graph-replayed decode step is
bound by its count of small kernels. Rounding as the torch form: logits, rank activations, gates and their product
each in the activations' dtype; ties choose the lower expert index (a stable sort's order)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(zp_ptr, rows_ptr, topk_ptr, experts_ptr, mid_ptr, x_ptr, C, E, R, stride_zg, stride_zt, stride_zc,
                  stride_k, stride_e, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    """mid[t, e R + r] = z[t, e R + r] gate[t, e]: z = zp[0, t] and the logits zp[1, t, :, :E] summed over chunks."""
    t = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    row = tl.load(rows_ptr + t).to(tl.int64)
    es, rs = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_R)
    e_ok = es < E
    cell = es[:, None] * R + rs[None, :]
    cell_ok = e_ok[:, None] & (rs < R)[None, :]
    z = tl.zeros((BLOCK_E, BLOCK_R), tl.float32)
    logits = tl.zeros((BLOCK_E,), tl.float32)
    for c in range(C):
        base = zp_ptr + t * stride_zt + c * stride_zc
        z += tl.load(base + cell, mask=cell_ok, other=0.0)
        logits += tl.load(base + stride_zg + es, mask=e_ok, other=0.0)
    k = tl.load(topk_ptr + row * stride_k).to(tl.float32).to(tl.int32)
    n = tl.maximum(tl.load(experts_ptr + row * stride_e).to(tl.float32).to(tl.int32), 1)
    valid = es < n
    logits = tl.where(valid, logits.to(dt).to(tl.float32), float("-inf"))
    li, lj = logits[:, None], logits[None, :]
    ahead = (lj > li) | ((lj == li) & (es[None, :] < es[:, None]))  # experts ranked before each one
    chosen = valid & (tl.sum(ahead.to(tl.int32), axis=1) < tl.maximum(k, 1))
    top = tl.max(tl.where(chosen, logits, float("-inf")), axis=0)
    w = tl.where(chosen, tl.exp(logits - top), 0.0)
    gates = tl.where(k > 0, w / tl.sum(w, axis=0), 0.0).to(dt).to(tl.float32)
    mid = (z.to(dt).to(tl.float32) * gates[:, None]).to(dt).to(tl.float32)
    tl.store(mid_ptr + t * E * R + cell, mid, mask=cell_ok)


def route(zp: torch.Tensor, rows: torch.Tensor, top_k: torch.Tensor, experts: torch.Tensor, dtype_of: torch.Tensor,
          n_experts: int, rank: int) -> torch.Tensor:
    """The gated rank activations (1, T, 1, E R) fp32 for ``row_expand`` from ``row_shrink``'s partial sums ``zp``
    (2, T, C, >= E R) of [the experts' A; the router]; ``top_k`` / ``experts`` (S+1, 1) the slots' k and expert
    counts (any dtype holding small integers), ``dtype_of`` a tensor of the activations' dtype."""
    t, chunks = zp.shape[1], zp.shape[2]
    mid = torch.empty(1, t, 1, n_experts * rank, device=zp.device, dtype=torch.float32)
    if t:
        _route_kernel[(t,)](zp, rows, top_k, experts, mid, dtype_of, chunks, n_experts, rank, zp.stride(0),
                            zp.stride(1), zp.stride(2), top_k.stride(0), experts.stride(0),
                            BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_R=triton.next_power_of_2(rank))
    return mid
