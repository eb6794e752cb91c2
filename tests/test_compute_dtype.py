"""On the fast path (CUDA, or ``PEFTLAB_FAST=1``) a bf16 model's adapters run their token-sized products in the
activations' dtype (``fast.compute_dtype``), whatever their parameters' dtype (fp32 here, as the trainer keeps them):
no matrix product over the tokens in fp32. GLoRA broke this (fp32 GEMMs of the whole weight: 3.4x PEFT's step on an
H100), and DeFT, Super-Tuning's LoRA part, AdaMSS, MoE-LoRA's experts, PVeRA's sampled path and the bottleneck
adapters cast the activations to fp32 for their low-rank products."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from models import batch, randomize_adapters, tiny_llama

B, T = 2, 37  # 74 tokens: a size no weight of the tiny model has
PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}
# by design in fp32: MoE-LoRA's router (routing decisions), SHADOW's own small network (a full-parameter model)
FP32_BY_DESIGN = {"molora": "router", "shadow": "shadow network"}


class _Fp32TokenProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)] + [out]
            if any(t.dtype == torch.float32 and B * T in t.shape for t in tensors):
                self.shapes.append([tuple(t.shape) for t in tensors])
        return out


def _bf16_model(config):
    """A one-layer bf16 Llama with ``config`` attached, its adapter parameters in fp32 (as the trainer keeps them)."""
    model = tiny_llama(layers=1).to(torch.bfloat16)
    peftlab.attach(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _fp32_token_products(config, monkeypatch) -> list:
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    model = _bf16_model(config)
    model.train()
    ids = batch(b=B, t=T)
    with _Fp32TokenProducts() as mode:
        model(input_ids=ids, labels=ids).loss.backward()
    return mode.shapes


@pytest.mark.parametrize("name", sorted(set(peftlab.variants()) - set(FP32_BY_DESIGN)))
def test_token_products_run_in_the_activations_dtype(name, monkeypatch):
    config = peftlab.variants()[name](["q_proj", "v_proj", "gate_proj", "down_proj"], 4)
    shapes = _fp32_token_products(config, monkeypatch)
    assert not shapes, f"{name}: fp32 products over the tokens {shapes[:4]}"


@pytest.mark.parametrize("name", ["deft", "supertuning", "adamss", "molora", "pvera", "bottleneck", "glora"])
def test_bf16_compute_stays_near_the_fp32_reference(name, monkeypatch):
    """The methods moved to the activations' dtype: a bf16 model's loss and adapter gradients on the fast path (bf16
    products) near the reference path's (fp32 products), non-trivial adapters, eval mode (no dropout, no sampling).
    MoE-LoRA routes to every expert here: a top-k choice flips where two logits nearly tie, and the two passes'
    upstream outputs differ by bf16 rounding."""
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    model = _bf16_model(peftlab.MoLoraConfig(r=4, num_experts=3, top_k=3, target_modules=targets) if name == "molora"
                        else peftlab.variants()[name](targets, 4))
    randomize_adapters(model, seed=5, std=0.05)
    model.eval()
    ids = batch(b=B, t=T)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("PEFTLAB_FAST", flag)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[flag] = loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                if p.grad is not None}
    (ref_loss, ref), (loss, grads) = results["0"], results["1"]
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    assert grads.keys() == ref.keys() and ref
    for key in ref:  # bf16 products: relative to the gradient's scale
        scale = ref[key].abs().max().clamp_min(1e-6)
        assert (grads[key] - ref[key]).abs().max() <= 0.05 * scale, f"{name} {key}"


def test_molora_runs_only_its_router_in_fp32(monkeypatch):
    experts = 3  # the router's output width; no other product of the test has it
    config = peftlab.MoLoraConfig(r=4, num_experts=experts, top_k=2, target_modules=["q_proj", "down_proj"])
    shapes = _fp32_token_products(config, monkeypatch)
    assert shapes and all(experts in s[0] + s[1] + s[-1] for s in shapes), shapes


def test_the_check_sees_an_fp32_token_product():
    with _Fp32TokenProducts() as mode:
        torch.randn(B * T, 8) @ torch.randn(8, 4)
        torch.randn(B * T, 8, dtype=torch.bfloat16) @ torch.randn(8, 4, dtype=torch.bfloat16)
    assert len(mode.shapes) == 1
