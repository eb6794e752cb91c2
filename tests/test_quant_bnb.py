"""QLoRA pieces that bitsandbytes' CPU backend runs for real: quantize / dequantize, forward, adapters on
quantized linears against a dense reference, merging with the error reported, PEFT QLoRA adapters, the fused node
and compiled layers over a 4-bit base. The dequantization forms themselves: test_quant_dequant.py."""

import pytest
import torch
from torch import nn

import peftlab
from models import TARGETS, batch, randomize_adapters, tiny_llama
from peftlab.core.config import ConfigError
from peftlab.core.registry import methods

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from peftlab.quant.bnb import (dequantize_weight, is_quantized_linear, merge_quantized,  # noqa: E402
                               prepare_for_kbit_training, quantize_model)


def _quantized(quant_type="nf4", double_quant=True, seed=0):
    model = tiny_llama(seed)
    return quantize_model(model, quant_type, double_quant=double_quant, compute_dtype=torch.float32)


def _dense_twin(qmodel):
    """The same model with every quantized linear replaced by nn.Linear holding its dequantized weight."""
    dense = tiny_llama()
    for name, module in qmodel.named_modules():
        if is_quantized_linear(module):
            target = dense.get_submodule(name)
            target.weight.data.copy_(dequantize_weight(module).float())
    dense.load_state_dict({k: v for k, v in qmodel.state_dict().items()
                           if k in dense.state_dict() and "proj" not in k}, strict=False)
    return dense


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_quantized_forward_equals_dense_dequantized(quant_type):
    q = _quantized(quant_type)
    n = sum(is_quantized_linear(m) for m in q.modules())
    assert n == 2 * 7 and type(q.lm_head) is nn.Linear
    dense = _dense_twin(q)
    ids = batch()
    with torch.no_grad():
        got, ref = q(input_ids=ids).logits, dense(input_ids=ids).logits
    tol = 5e-2 if quant_type == "int8" else 1e-4  # int8: bnb's matmul quantizes activations too
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    w = dequantize_weight(q.model.layers[0].mlp.up_proj)
    orig = tiny_llama().model.layers[0].mlp.up_proj.weight
    rel = float((w.float() - orig).norm() / orig.norm())
    assert 0 < rel < {"int8": 0.02, "nf4": 0.25, "fp4": 0.3}[quant_type]


WEIGHT_METHODS = sorted(n for n, f in peftlab.variants().items()
                        if methods()[f(["q_proj"], 4).peft_type].kind == "weight")


@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_every_weight_method_on_a_4bit_base_equals_the_dense_reference(name):
    q = _quantized("nf4")
    dense = _dense_twin(q)
    config = peftlab.variants()[name](TARGETS["llama"], 4)
    for model in (q, dense):
        torch.manual_seed(0)
        peftlab.attach(model, config)
        randomize_adapters(model, seed=3, std=0.05)
    ids = batch()
    with torch.no_grad():
        got, ref = q(input_ids=ids).logits, dense(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the adapter trains on the quantized base: gradients reach it, the base stays frozen
    q.train()
    q(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in q.parameters() if p.requires_grad)
    # adapter tensors sit in adapters or, for token rows (TRAINABLE_TOKENS), in core's per-adapter module entries
    assert not any(p.requires_grad for n, p in q.named_parameters()
                   if "adapters" not in n and "modules_to_save" not in n)


def test_merge_into_a_quantized_base_reports_the_error():
    q = _quantized("nf4")
    peftlab.attach(q, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    randomize_adapters(q, std=0.05)
    ids = batch()
    with torch.no_grad():
        before = q(input_ids=ids).logits
    module = q.model.layers[1].mlp.down_proj
    target = module.adapters["default"].merge_into(module.view.weight_oi().float(), module.view)
    report = merge_quantized(q)
    assert len(report["modules"]) == 14 and 0 < report["relative_error"] < 0.3
    assert report["max_module_error"] >= report["relative_error"]
    # independent reference: quantize the merged dense weight with bitsandbytes directly
    import bitsandbytes.functional as F
    packed, state = F.quantize_4bit(target.to(torch.float32), quant_type="nf4", compress_statistics=True)
    again = F.dequantize_4bit(packed, state).float()
    expected = float((again - target).norm() / target.norm())
    assert report["modules"]["model.layers.1.mlp.down_proj"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        after = q(input_ids=ids).logits
    assert is_quantized_linear(q.model.layers[0].self_attn.q_proj.base_layer)
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.3  # the merge itself is exact; what is left is the re-quantization


def test_pissa_init_rewrites_the_quantized_base():
    q = _quantized("nf4")
    w0 = dequantize_weight(q.model.layers[0].self_attn.q_proj).clone()
    peftlab.attach(q, peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    module = q.model.layers[0].self_attn.q_proj
    residual = module.view.weight_oi().float()
    layer = module.adapters["default"]
    rebuilt = residual + layer.delta_weight()
    assert float((rebuilt - w0.float()).norm() / w0.float().norm()) < 0.35  # one more 4-bit rounding
    assert float((residual - w0.float()).norm()) > 0.1  # the principal part moved into the adapter


def test_peft_qlora_adapter_loads_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_quantized("nf4"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=TARGETS["llama"]))
    randomize_adapters(theirs, seed=7, std=0.05)
    theirs.save_pretrained(tmp_path)
    ours = _quantized("nf4")
    peftlab.load_adapter(ours, tmp_path)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_prepare_for_kbit_training_keeps_norms_fp32_and_outputs_half():
    model = tiny_llama().to(torch.bfloat16)
    quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
    prepare_for_kbit_training(model)
    norm = model.model.layers[0].input_layernorm
    assert norm.weight.dtype == torch.float32 and not norm.weight.requires_grad
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = norm(torch.randn(2, 3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_refusals_name_the_problem():
    q = _quantized("nf4")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(q, "nf4")
    with pytest.raises(ConfigError, match="quantize must be one of"):
        quantize_model(tiny_llama(), "nf3")
    adapted = tiny_llama()
    peftlab.attach(adapted, peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="before attaching"):
        quantize_model(adapted, "nf4")


def test_export_merged_fp16_model_reloads_with_the_same_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    from peftlab.quant.export import export_merged

    q = _quantized("nf4")
    peftlab.attach(q, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True))
    randomize_adapters(q, std=0.05)
    ids = batch()
    with torch.no_grad():
        expected = q(input_ids=ids).logits
    report = export_merged(q, tmp_path / "merged", dtype=torch.float16)
    assert report["dequantized"] == 14 and not report["has_adapters"]
    config = (tmp_path / "merged" / "config.json").read_text()
    assert "peftlab_quantization" not in config and "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert plain.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # fp16 storage; the adapter moves logits ~0.3


@pytest.mark.parametrize("variant,quant_type", [("lora", "nf4"), ("dora", "nf4"), ("lora", "fp4"), ("lora", "int8")])
def test_fused_node_over_a_quantized_base_equals_the_reference_path(variant, quant_type, monkeypatch):
    """The fused LoRA/DoRA node dequantizes a 4-bit base itself (forward and backward, never keeping the dense
    weight): loss and every adapter gradient equal the reference path through bitsandbytes' layer; an int8 base keeps
    bitsandbytes' own kernels (the node is not used there, so the two paths are the same code)."""
    from models import losses_and_grads_by_fast_flag

    model = quantize_model(tiny_llama(), quant_type, double_quant=True, compute_dtype=torch.float32)
    peftlab.attach(model, peftlab.variants()[variant](TARGETS["llama"], 4))
    randomize_adapters(model)
    (loss_ref, grads_ref), (loss_fast, grads_fast) = losses_and_grads_by_fast_flag(model, batch(b=2, t=10), monkeypatch)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_ref and grads_ref.keys() == grads_fast.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_node_keeps_no_dense_copy_of_a_4bit_weight(monkeypatch):
    """What the fused node saves for backward over a 4-bit base: no tensor of the layer's dense (out, in) size."""
    from peftlab.ops import fast

    model = quantize_model(tiny_llama(), "nf4", compute_dtype=torch.float32)
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    q = model.model.layers[0].self_attn.q_proj
    dense_shape = (q.view.out_features, q.view.in_features)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(input_ids=batch(b=1, t=6), labels=batch(b=1, t=6)).loss
    assert dense_shape not in saved and (dense_shape[1], dense_shape[0]) not in saved
    loss.backward()
    assert fast.operands(torch.zeros(1, 2, dense_shape[1]), q.view) is not None  # the fused path did apply


def test_dora_on_a_4bit_base_dequantizes_twice_a_step_and_keeps_its_row_norms(monkeypatch):
    """DoRA's norm needs the dense W0: the fused node reuses that dequantization for its forward GEMM (forward and
    backward: two a step, was three), keeps no dense copy for backward, and ||W0||^2 is cached on the packed storage
    (the dense W0 is a new tensor each time, so a cache keyed on it recomputed a float32 pass every forward)."""
    from peftlab.quant import bnb as qbnb

    model = quantize_model(tiny_llama(hidden=64, intermediate=128), "nf4", compute_dtype=torch.float32)
    peftlab.attach(model, peftlab.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    randomize_adapters(model)
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    q = model.model.layers[1].self_attn.q_proj  # its input needs a gradient (layer 0's adapter), so backward dequantizes
    layer = q.adapters["default"]
    dense_shape = (q.view.out_features, q.view.in_features)
    calls, saved = [], []
    real = qbnb.dequantize_weight
    monkeypatch.setattr(qbnb.BnbCodec, "dense", lambda self, module: calls.append(module) or real(module))
    ids = batch(b=1, t=6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert sum(m is q.base_layer for m in calls) == 2 and dense_shape not in saved
    cached = layer._w0_sq_value
    model(input_ids=ids, labels=ids)
    assert layer._w0_sq_value is cached


@pytest.mark.parametrize("ckpt", ["off", "on", "offload"])
def test_compiled_layers_over_a_4bit_base_equal_eager(ckpt, monkeypatch):
    """Decoder layers compiled (aot_eager) over 4-bit linears, the fused node dequantizing inside the graph, under
    peftlab's checkpointing: the eager loss and every adapter gradient, without graph breaks (the bench's
    PEFTLAB_BENCH_COMPILE rows for the QLoRA settings rely on it). Compiled, the weights are dequantized by
    peftlab's torch form, eager by bitsandbytes' kernel; whole blocks per row (hidden 64, MLP 128), as the CPU
    kernel gets other rows wrong (peftlab/quant/dequant.py)."""
    import torch._dynamo

    from peftlab.train.activations import checkpointing
    from peftlab.train.packing import compile_model

    monkeypatch.setenv("PEFTLAB_FAST", "1")

    def run(compiled):
        model = quantize_model(tiny_llama(hidden=64, intermediate=128), "nf4", double_quant=True,
                               compute_dtype=torch.float32)
        peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=TARGETS["llama"]))
        randomize_adapters(model)
        model.config.use_cache = False
        if compiled:
            compile_model(model, "aot_eager", "layers")
        ids = batch(b=2, t=10)
        with checkpointing(model, ckpt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    (loss_ref, grads_ref), (loss, grads) = run(False), run(True)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads and grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
