"""Fused linear + cross-entropy against the plain materializing form (values and gradients)."""
import pytest
import torch

from devices import DEVICES

from peftlab.ops.fused_ce import (auto_chunk_size, causal_lm_loss, fused_linear_cross_entropy,
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


# -- the row kernel (ops/ce_rows.py): Triton on CUDA, in the interpreter on CPU (conftest sets TRITON_INTERPRET) --

@pytest.fixture
def row_kernel(monkeypatch):
    monkeypatch.setenv("PEFTLAB_CE_KERNEL", "1")  # on CPU too (in the interpreter)


def _kernel_or_skip(device):
    from peftlab.ops.ce_rows import kernel_usable
    if not kernel_usable(torch.empty(1, device=device)):
        pytest.skip("the Triton row kernel cannot run here (no Triton, or CPU without TRITON_INTERPRET=1)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 4100), (torch.bfloat16, 5000), (torch.float32, 7)])
def test_row_kernel_matches_reference(device, dtype, vocab, row_kernel):
    from peftlab.ops.ce_rows import ce_rows, ce_rows_reference
    _kernel_or_skip(device)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, vocab, generator=g) * 4).to(device=device, dtype=dtype)
    logits[2, :vocab // 2] = -1e4  # a row with most of its mass elsewhere
    target = torch.randint(0, vocab, (6,), generator=g).to(device)
    target[[1, 4]] = -100
    target[5] = vocab - 1  # the last column, in the last (partial) block
    scale = torch.tensor(0.25, device=device)
    z_ref, z_got = logits.clone(), logits.clone()
    loss_ref = ce_rows_reference(z_ref, target, scale, -100)
    loss_got = ce_rows(z_got, target, scale, -100)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_got, z_ref, **tol)
    assert loss_got[1] == 0 and loss_got[4] == 0 and bool((z_got[1] == 0).all())
    # the gradient rows sum to zero (softmax - onehot), scaled by 0.25 where the target counts
    torch.testing.assert_close(z_got.float().sum(1), torch.zeros(6, device=device), rtol=0, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_loss_through_the_row_kernel_matches_reference(device, row_kernel):
    _kernel_or_skip(device)
    hidden, weight, _, target = _case(n=29, v=3000, seed=5)
    hidden, weight = hidden.detach().to(device).requires_grad_(), weight.detach().to(device)  # a frozen head
    target = target.to(device)
    loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=8)  # no bias, frozen head: kernel path
    (loss * 1.7).backward()
    h2 = hidden.detach().clone().requires_grad_()
    ref = fused_linear_cross_entropy_reference(h2, weight, target)
    (ref * 1.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-4, atol=1e-6)


def test_chunk_budget_default_and_knob(monkeypatch):
    monkeypatch.delenv("PEFTLAB_CE_CHUNK_MIB", raising=False)
    assert (256 << 20) // (4 * 128256) == 523 and auto_chunk_size(128256) == 512  # a multiple of 256 rows
    monkeypatch.setenv("PEFTLAB_CE_CHUNK_ALIGN", "1")
    assert auto_chunk_size(128256) == 523
    monkeypatch.delenv("PEFTLAB_CE_CHUNK_ALIGN")
    monkeypatch.setenv("PEFTLAB_CE_CHUNK_MIB", "64")
    assert auto_chunk_size(128256) == (64 << 20) // (4 * 128256)
    assert auto_chunk_size(10**9) == 64  # never fewer rows than 64
    assert auto_chunk_size(128256, budget_bytes=4 * 128256 * 100) == 100  # an explicit budget wins


def test_virtual_leading_positions_are_ignored_rows_not_a_copy():
    """Prompt tuning's hidden states hold the virtual tokens first: the loss over all positions with those ignored
    equals the loss over the sliced real positions, their gradient is zero, and the rows handed to the fused loss
    are the hidden states' own storage (no copy)."""
    from peftlab.ops.fused_ce import shift_for_causal_lm

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 4 + 9, 16, generator=g).requires_grad_()
    weight = torch.randn(50, 16, generator=g) * 0.3
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[1, :3] = -100
    rows, _ = shift_for_causal_lm(hidden, labels, virtual=4)
    assert rows.data_ptr() == hidden.data_ptr()
    loss = causal_lm_loss(hidden, weight, labels, virtual=4, chunk_size=5)
    loss.backward()
    sliced = hidden.detach()[:, 4:].clone().requires_grad_()
    ref = causal_lm_loss(sliced, weight, labels, chunk_size=5)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad[:, 4:], sliced.grad)
    assert not hidden.grad[:, :4].any()
    with pytest.raises(ValueError, match="with 3 virtual tokens first"):
        causal_lm_loss(hidden, weight, labels, virtual=3)


@pytest.mark.parametrize("frozen_head", [True, False], ids=["row-kernel-path", "fp32-path"])
def test_one_chunk_of_logits_alive_at_a_time(frozen_head):
    """Each chunk's logits are freed before the next chunk's product is allocated (the loop once held two chunks
    at its peak, 256 MiB at the 1B shape): counted by the vocabulary-wide products alive at each op."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveProducts(TorchDispatchMode):
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.live, self.peak = vocab, set(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[-1] == self.vocab:
                self.live.add(id(out))
                weakref.finalize(out, self.live.discard, id(out))
                self.peak = max(self.peak, len(self.live))
            return out

    hidden, weight, _, target = _case(n=40, v=50)
    weight.requires_grad_(not frozen_head)
    with LiveProducts(50) as mode:
        fused_linear_cross_entropy(hidden, weight, target, chunk_size=8)
    assert mode.peak == 1
