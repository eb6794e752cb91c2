"""The second half of a sub-layer (bottleneck) table's fixed-shape step in one Triton launch: after the row kernels'
shrink of the down projection (``kernels.row_shrink``), each program takes one token and a tile of the hidden size,
sums the shrink's partial sums with the down bias, applies the activation, multiplies by the up projection's rows
(read in place), adds the up bias and blends with the sub-layer's output:

    out[t] = keep[s] y[t] + scaling[s] (up[s] phi(z[t] + down_bias[s]) + up_bias[s])       (s: token t's row)

In torch the same is about fifteen small kernels per sub-layer (gathers of five small tables, the bias, the
activation, casts, the blend), and a graph-replayed decode step is bound by its count of small kernels. Rounding as
the torch form (``SublayerForm``'s ``bottleneck_mlp`` and the blend): each product with its bias in fp32, then once
to the activations' dtype; the activation of the rounded sum, rounded; ``keep y`` and ``scaling update`` rounded
before their sum. The activations with a form here: ``ACTIVATIONS`` (others stay in torch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# transformers' ACT2FN names whose function is one torch op (computed in fp32 and rounded once, as here)
ACTIVATIONS = {"relu": 0, "silu": 1, "swish": 1, "gelu": 2, "gelu_pytorch_tanh": 3, "tanh": 4}


@triton.jit
def _phi(z, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(z, 0.0)
    elif ACT == 1:
        out = z * tl.sigmoid(z)
    elif ACT == 2:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(u) = 2 sigmoid(2 u)
    else:
        out = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return out


@triton.jit
def _sublayer_expand_kernel(zp_ptr, rows_ptr, y_ptr, out_ptr, db_ptr, up_ptr, ub_ptr, keep_ptr, scaling_ptr, H, W, C,
                            skip_row, stride_zt, stride_zc, stride_yt, stride_ot, stride_db, stride_us, stride_un,
                            stride_ub, stride_keep, stride_scaling, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    dt = out_ptr.dtype.element_ty
    row = tl.load(rows_ptr + t).to(tl.int64)
    ws, cs = tl.arange(0, BLOCK_W), tl.arange(0, BLOCK_C)
    w_ok = ws < W
    chunks = C * (row != skip_row).to(tl.int32)  # the shrink wrote nothing for skip_row's tokens: z = 0 there
    zp = tl.load(zp_ptr + t * stride_zt + cs[:, None] * stride_zc + ws[None, :],
                 mask=(cs < chunks)[:, None] & w_ok[None, :], other=0.0)
    z = tl.sum(zp, axis=0) + tl.load(db_ptr + row * stride_db + ws, mask=w_ok, other=0.0).to(tl.float32)
    h = _phi(z.to(dt).to(tl.float32), ACT).to(dt).to(tl.float32)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < H
    up = tl.load(up_ptr + row * stride_us + ns[:, None] * stride_un + ws[None, :], mask=n_ok[:, None] & w_ok[None, :],
                 other=0.0).to(tl.float32)
    update = tl.sum(up * h[None, :], axis=1) + tl.load(ub_ptr + row * stride_ub + ns, mask=n_ok, other=0.0).to(tl.float32)
    keep = tl.load(keep_ptr + row * stride_keep).to(tl.float32)
    scaling = tl.load(scaling_ptr + row * stride_scaling).to(tl.float32)
    y = tl.load(y_ptr + t * stride_yt + ns, mask=n_ok, other=0.0).to(tl.float32)
    out = (y * keep).to(dt).to(tl.float32) + (scaling * update.to(dt).to(tl.float32)).to(dt).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + ns, out.to(dt), mask=n_ok)


def sublayer_expand(zp: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor,
                    up_bias: torch.Tensor, keep: torch.Tensor, scaling: torch.Tensor, activation: str,
                    skip_row: int = -1, lanes: bool = False) -> torch.Tensor:
    """The adapted outputs (T, H) of every token (see the module's formula): ``zp`` (T, C, >= W) fp32 ``row_shrink``'s
    partial sums of down (S+1, W, H) for the tokens' sources (nothing written for ``skip_row``'s tokens, which then
    read z = 0), y (T, H) the sub-layer's output, down_bias (S+1, W), up (S+1, H, W), up_bias (S+1, H), keep and
    scaling (S+1, 1), ``activation`` one of ``ACTIVATIONS``; rows (T,) on the device. ``lanes``: by lanes of token
    tiles (``lane_expands.lane_sublayer_expand``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"sublayer_expand: activation {activation!r} has no kernel form; one of {sorted(ACTIVATIONS)}")
    t, h = y.shape
    w = up.shape[2]
    if (zp.dim() != 3 or zp.shape[0] != t or zp.shape[2] < w or down_bias.shape[1] != w or up.shape[1] != h
            or up_bias.shape[1] != h or rows.shape != (t,) or any(v.stride(-1) != 1 for v in (y, down_bias, up, up_bias))):
        raise ValueError(f"sublayer_expand: shapes zp {tuple(zp.shape)}, y {tuple(y.shape)}, down_bias "
                         f"{tuple(down_bias.shape)}, up {tuple(up.shape)}, up_bias {tuple(up_bias.shape)}, rows "
                         f"{tuple(rows.shape)} do not fit (row-major last dimensions)")
    out = torch.empty_like(y)
    if t == 0:
        return out
    # the keyword arguments the one-token and lane kernels share
    args = dict(zp_ptr=zp, rows_ptr=rows, y_ptr=y, out_ptr=out, db_ptr=down_bias, up_ptr=up, ub_ptr=up_bias,
                keep_ptr=keep, scaling_ptr=scaling, H=h, W=w, C=zp.shape[1], skip_row=skip_row, stride_zt=zp.stride(0),
                stride_zc=zp.stride(1), stride_yt=y.stride(0), stride_ot=out.stride(0), stride_db=down_bias.stride(0),
                stride_us=up.stride(0), stride_un=up.stride(1), stride_ub=up_bias.stride(0),
                stride_keep=keep.stride(0), stride_scaling=scaling.stride(0), ACT=ACTIVATIONS[activation],
                BLOCK_C=triton.next_power_of_2(zp.shape[1]))
    if lanes:
        from peftlab.serve.lane_expands import lane_sublayer_expand

        lane_sublayer_expand(args, t)
    else:
        block_w = triton.next_power_of_2(w)
        block_n = max(16, min(128, 8192 // block_w))  # a (BLOCK_N, W) tile of up per program
        _sublayer_expand_kernel[(t, triton.cdiv(h, block_n))](**args, BLOCK_N=block_n, BLOCK_W=block_w)
    return out
