"""Causal attention over a KV prefix without a mask (peftlab/ops/prefix_attention.py): the kernel against an einsum
reference (grouped queries, gradients), a prefix-tuned model under ``peftlab_sdpa`` against the same model under
transformers' ``sdpa`` (logits and gradients; right padding takes the kernel too, left padding keeps the mask), and the switch's bookkeeping."""
import pytest
import torch

import peftlab
from models import VOCAB, tiny_llama
from peftlab.ops import prefix_attention


def _reference(q, k, v, scale):
    """Scores, the bottom-right causal mask written out as a loop over queries, softmax, values."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    queries, keys = q.shape[2], k.shape[2]
    for i in range(queries):
        scores[:, :, i, keys - queries + i + 1:] = float("-inf")
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float())


def _qkv(device="cpu", dtype=torch.float32, heads=4, kv_heads=2, queries=7, keys=12, dim=16):
    g = torch.Generator().manual_seed(0)
    make = lambda h, n: torch.randn(2, h, n, dim, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return make(heads, queries), make(kv_heads, keys), make(kv_heads, keys)


def _check(device, dtype, atol):
    q, k, v = _qkv(device, dtype)
    got = prefix_attention.bottom_right_attention(q, k, v, scale=0.3)
    want = _reference(q, k, v, 0.3)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got.float(), (q, k, v), g)
    wants = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 4, rtol=atol * 4)


def test_bottom_right_attention_equals_the_written_out_mask():
    _check("cpu", torch.float32, 1e-5)


def test_bottom_right_mask():
    assert prefix_attention.bottom_right_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_bottom_right_attention_with_as_many_queries_as_keys():
    q, k, v = _qkv(queries=12)
    torch.testing.assert_close(prefix_attention.bottom_right_attention(q, k, v, 0.3), _reference(q, k, v, 0.3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels and the flash kernel run on CUDA")
@pytest.mark.parametrize("fa2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bottom_right_on_cuda(monkeypatch, dtype, fa2):
    """The default (zero rows before the queries, SDPA's is_causal) and ``PEFTLAB_PREFIX_FLASH=fa2``'s form."""
    monkeypatch.setattr(prefix_attention, "_FA2", fa2)
    q, k, _ = _qkv("cuda", dtype, dim=64)
    assert prefix_attention._fa2_takes(q, k) == fa2
    _check("cuda", dtype, 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels' forms")
@pytest.mark.parametrize("fa2", [False, True])
def test_bottom_right_compiles_in_one_graph(monkeypatch, fa2):
    monkeypatch.setattr(prefix_attention, "_FA2", fa2)
    torch._dynamo.reset()
    q, k, v = _qkv("cuda", torch.bfloat16, dim=64)
    got = torch.compile(prefix_attention.bottom_right_attention, fullgraph=True)(q, k, v, 0.3)
    torch.testing.assert_close(got.float(), _reference(q, k, v, 0.3), atol=2e-2, rtol=2e-2)


def test_fa2_knob_needs_flash_devices(monkeypatch):
    """``PEFTLAB_PREFIX_FLASH=fa2`` is read at install and taken only where every CUDA device runs flash."""
    monkeypatch.setattr(prefix_attention, "_FA2", False)
    monkeypatch.setenv("PEFTLAB_PREFIX_FLASH", "fa2")
    peftlab.attach(tiny_llama(), peftlab.PrefixTuningConfig(num_virtual_tokens=3))
    assert prefix_attention._FA2 == prefix_attention._flash_devices()
    monkeypatch.delenv("PEFTLAB_PREFIX_FLASH")
    peftlab.attach(tiny_llama(), peftlab.PrefixTuningConfig(num_virtual_tokens=3))
    assert prefix_attention._FA2 is False


def _prefix_model(seed=0):
    model = tiny_llama(seed=seed)
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=5))
    model.train()
    return model


def _step(model, ids, mask=None):
    """Logits at the real positions and the gradients of a loss over them (pad positions masked, as SFT's loss)."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    logits[real].float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[real], grads


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_prefix_model_equals_sdpa(monkeypatch, padding):
    """The same adapter with and without the switch: equal logits and gradients at the real positions. Unpadded
    or right-padded, every layer takes the mask-free kernel (counted); left-padded, the mask stays and the kernel is
    never called."""
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    if padding == "right":
        mask[1, 6:] = 0
        mask[2, 1:] = 0
    calls = []
    real = prefix_attention.bottom_right_attention
    monkeypatch.setattr(prefix_attention, "bottom_right_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _prefix_model()
    assert model.config._attn_implementation == prefix_attention.NAME
    got = _step(model, ids, mask)
    assert len(calls) == (0 if padding == "left" else model.config.num_hidden_layers)
    model.config._attn_implementation = "sdpa"
    want = _step(model, ids, mask)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-5, rtol=1e-4)


def test_padding_not_at_the_ends_keeps_the_mask():
    mask = torch.ones(2, 12, dtype=torch.long)
    assert prefix_attention._causal_suffices(mask, 12) and prefix_attention._causal_suffices(None, 12)
    mask[0, 9:] = 0
    assert prefix_attention._causal_suffices(mask, 12)
    mask[1, 4] = 0  # a hole: a later real token must not see it
    assert not prefix_attention._causal_suffices(mask, 12)
    assert not prefix_attention._causal_suffices(torch.ones(2, 11, dtype=torch.long), 12)


def test_switch_is_counted_and_undone_on_delete():
    model = tiny_llama()
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=3), name="a")
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=2), name="b")
    assert model.config._attn_implementation == prefix_attention.NAME
    peftlab.delete_adapter(model, "a")
    assert model.config._attn_implementation == prefix_attention.NAME, "b still has a prefix"
    peftlab.delete_adapter(model, "b")
    assert model.config._attn_implementation == "sdpa"
    assert "_attn_implementation" not in model.config.to_dict()


def test_other_implementations_and_the_knob_stay(monkeypatch):
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=3))
    assert model.config._attn_implementation == "eager"
    monkeypatch.setenv("PEFTLAB_PREFIX_FLASH", "0")
    model = tiny_llama()
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=3))
    assert model.config._attn_implementation == "sdpa"
