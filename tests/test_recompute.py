"""The lean block checkpoint (peftlab/train/recompute.py): taken where it may be, torch's elsewhere, and the
gradients of no checkpointing either way (all methods: tests/test_activations.py, which runs it by default)."""
import pytest
import torch

import peftlab
from models import batch, tiny_gpt2, tiny_llama, tiny_neox
from peftlab.train import activations, recompute
from peftlab.train.activations import checkpointing


def _grads(model, ids, mode, autocast=False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with checkpointing(model, mode, min_offload_bytes=0), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _counting(monkeypatch):
    calls = {"lean": 0, "torch": 0}
    lean, torch_checkpoint = recompute.recompute, activations.checkpoint
    monkeypatch.setattr(recompute, "recompute", lambda *a, **k: calls.__setitem__("lean", calls["lean"] + 1) or
                        lean(*a, **k))
    monkeypatch.setattr(activations, "checkpoint", lambda *a, **k: calls.__setitem__("torch", calls["torch"] + 1)
                        or torch_checkpoint(*a, **k))
    return calls


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_neox])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_node_gives_the_gradients_of_no_checkpointing(build, autocast, monkeypatch):
    """Llama blocks return a tensor, GPT-2 / NeoX blocks a tuple; under CPU bf16 autocast the recompute must run in
    bf16 again; LoRA dropout draws the same masks (the RNG state is replayed)."""
    model = build()
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.train()
    ids = batch(b=2, t=9)
    ref_loss, ref = _grads(model, ids, "off", autocast)
    calls = _counting(monkeypatch)
    for mode in ("on", "offload"):
        loss, grads = _grads(model, ids, mode, autocast)
        torch.testing.assert_close(loss, ref_loss)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
    assert calls["lean"] > 0 and calls["torch"] == 0, calls


def test_torch_checkpoint_where_the_lean_node_would_lose_a_gradient(monkeypatch):
    """MoLoRA computes its balancing loss in forward (``loss_in_forward``); prefix tuning passes a KV cache; a
    keyword tensor that requires grad; PEFTLAB_CKPT_REENTRANT=0: each keeps torch's checkpoint."""
    lora, molora, prefix = tiny_llama(), tiny_llama(), tiny_llama()
    peftlab.attach(lora, peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    peftlab.attach(molora, peftlab.MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj"]))
    peftlab.attach(prefix, peftlab.PrefixTuningConfig(num_virtual_tokens=2))
    assert recompute.enabled_for(lora) and not recompute.enabled_for(molora)
    monkeypatch.setenv("PEFTLAB_CKPT_REENTRANT", "0")
    assert not recompute.enabled_for(lora)
    monkeypatch.delenv("PEFTLAB_CKPT_REENTRANT")
    hidden = torch.zeros(1, 2, 4)
    assert recompute.eligible((hidden,), {"position_ids": torch.zeros(1, 2)}, activations._is_cache)
    assert not recompute.eligible((hidden,), {"extra": torch.zeros(2, requires_grad=True)}, activations._is_cache)
    assert not recompute.eligible((hidden, torch.zeros(2, requires_grad=True)), {}, activations._is_cache)
    assert not recompute.eligible(((hidden,),), {}, activations._is_cache)
    nested = {"position_embeddings": (torch.zeros(2), torch.zeros(2, requires_grad=True))}
    assert not recompute.eligible((hidden,), nested, activations._is_cache)
    calls = _counting(monkeypatch)
    ids = batch(b=2, t=7)
    for model in (molora, prefix):
        model.train()
        _grads(model, ids, "on")
    assert calls["lean"] == 0 and calls["torch"] > 0, calls
    router = [p.grad for n, p in molora.named_parameters() if "router" in n]
    assert router and all(g is not None and g.abs().sum() > 0 for g in router)
