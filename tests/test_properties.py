"""Property tests (hypothesis) of the LoRA/DoRA layer maths against short einsum references."""
import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import peftlab
from peftlab.core.adapter import AdaptedModule


def _wrapped(in_f, out_f, r, alpha, use_dora, rslora, seed, bias):
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    peftlab.attach(holder, peftlab.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_dora=use_dora,
                                              use_rslora=rslora, init_lora_weights=False))
    return holder


dims = st.integers(min_value=1, max_value=24)


def _close(got: torch.Tensor, want: torch.Tensor, row_rtol: torch.Tensor) -> None:
    """|got - want| <= 1e-4 + (1e-4 + row_rtol[o]) |want|, elementwise (o: the output feature)."""
    bound = 1e-4 + (1e-4 + row_rtol) * want.abs()
    excess = (got - want).abs() - bound
    assert (excess <= 0).all(), f"max excess over the bound {float(excess.max()):.3g}"


@settings(max_examples=40, deadline=None)
@given(in_f=dims, out_f=dims, r=st.integers(1, 8), alpha=st.floats(0.5, 32), batch=st.integers(1, 5),
       use_dora=st.booleans(), rslora=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
@example(in_f=1, out_f=23, r=4, alpha=28.0, batch=1, use_dora=True, rslora=True, bias=False, seed=23)  # CI, 12-05
def test_forward_matches_einsum_reference_and_merge(in_f, out_f, r, alpha, batch, use_dora, rslora, bias, seed):
    """DoRA's row norm comes from the expansion ||W||^2 + 2s<W, BA> + s^2 ||BA||^2 (dora.py: W + sBA is never
    built), whose fp32 rounding is relative to those terms, not to their sum: where they cancel (a row of W + sBA
    much shorter than W and sBA; hypothesis found one with 1 input feature) the tolerance of that row grows by
    the ratio of a bound of the terms to the sum, computed here in float64."""
    holder = _wrapped(in_f, out_f, r, alpha, use_dora, rslora, seed, bias)
    module: AdaptedModule = holder[0]
    layer = module.adapters["default"]
    w = module.base_layer.weight
    b = module.base_layer.bias if bias else torch.zeros(out_f)
    a_mat, b_mat = layer.lora_A.weight, layer.lora_B.weight
    s = alpha / (math.sqrt(r) if rslora else r)
    x = torch.randn(batch, 3, in_f)
    delta = s * torch.einsum("or,ri->oi", b_mat, a_mat)
    if use_dora:
        combined = w + delta
        ref_w = layer.lora_magnitude_vector[:, None] * combined / combined.norm(dim=1, keepdim=True)
    else:
        ref_w = w + delta
    expected = torch.einsum("bti,oi->bto", x, ref_w) + b
    row_rtol = torch.zeros(out_f)
    if use_dora:
        w64, d64 = w.detach().double(), delta.detach().double()
        # each term's rounding is bounded by that of the products it sums: (|W_o| + s |B_o| |A|_F)^2 bounds them all
        terms = (w64.norm(dim=1) + s * b_mat.detach().double().norm(dim=1) * a_mat.detach().double().norm()) ** 2
        row_rtol = (16 * torch.finfo(torch.float32).eps * terms / (w64 + d64).pow(2).sum(1)).float()
    with torch.no_grad():
        out = holder(x)
        _close(out, expected, row_rtol)
        peftlab.merge(holder)
        _close(holder(x), out, row_rtol)
        peftlab.unmerge(holder)
        torch.testing.assert_close(module.base_layer.weight, w, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(num=st.integers(2, 30), dim=st.integers(1, 16), r=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_embedding_lora_matches_reference(num, dim, r, seed):
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Embedding(num, dim))
    peftlab.attach(holder, peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False))
    layer = holder[0].adapters["default"]
    ids = torch.randint(0, num, (2, 5))
    ref = holder[0].base_layer.weight[ids] + 2 * (layer.lora_embedding_A.t()[ids] @ layer.lora_embedding_B.t())
    with torch.no_grad():
        torch.testing.assert_close(holder(ids), ref, atol=1e-5, rtol=1e-5)
