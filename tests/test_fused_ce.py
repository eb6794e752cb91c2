"""Fused linear + cross-entropy against the plain materializing form (values and gradients)."""
import pytest
import torch

from peftlab.ops.fused_ce import (causal_lm_loss, fused_linear_cross_entropy,
                                  fused_linear_cross_entropy_reference)


def _case(n=37, h=16, v=50, seed=0, dtype=torch.float32, ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore] = -100
    return hidden, weight, bias, target


def _grads(fn, hidden, weight, bias, target, **kw):
    for t in (hidden, weight, bias):
        t.grad = None
    loss = fn(hidden, weight, target, bias=bias, **kw)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_matches_reference_fp32(chunk):
    case = _case()
    ref = _grads(fused_linear_cross_entropy_reference, *case)
    got = _grads(fused_linear_cross_entropy, *case, chunk_size=chunk)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_close_to_fp32_reference():
    case = _case(dtype=torch.bfloat16)
    ref = _grads(fused_linear_cross_entropy_reference, *case)
    got = _grads(fused_linear_cross_entropy, *case, chunk_size=8)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_frozen_head_gets_no_grad_and_hidden_grad_matches():
    hidden, weight, _, target = _case(seed=3)
    weight.requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=7)
    loss.backward()
    assert weight.grad is None
    h2 = hidden.detach().clone().requires_grad_()
    fused_linear_cross_entropy_reference(h2, weight, target).backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_all_ignored_is_zero_not_nan():
    hidden, weight, bias, target = _case(seed=4)
    target[:] = -100
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_no_grad_mode_computes_only_the_loss():
    hidden, weight, bias, target = _case(seed=5)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, chunk_size=4)
    ref = fused_linear_cross_entropy_reference(hidden, weight, target, bias=bias)
    torch.testing.assert_close(loss, ref.detach())


def test_causal_lm_loss_equals_transformers_shifted_loss():
    from models import batch, tiny_llama

    model = tiny_llama()
    ids = batch(b=3, t=11)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    fused = causal_lm_loss(out.hidden_states[-1], model.lm_head.weight, labels, chunk_size=6)
    torch.testing.assert_close(fused, out.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(out.hidden_states[-1], model.lm_head.weight, labels[:, 1:])


def test_bad_shapes_are_named():
    hidden, weight, _, target = _case()
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_linear_cross_entropy(hidden[:, :5], weight, target)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, target, chunk_size=0)
