"""LoRA / DoRA parity with HF PEFT (the oracle), both directions, on four tiny architectures."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from models import ARCHS, TARGETS, batch, check_merge_unmerge, randomize_adapters

VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj|c_attn|query_key_value": 2},
                            alpha_pattern={"v_proj|c_attn|query_key_value": 3}),
}
ARCH_NAMES = sorted(ARCHS)


def peft_model(arch, kwargs, targets=None):
    base = ARCHS[arch]()
    cfg = peft.LoraConfig(target_modules=targets or TARGETS[arch], init_lora_weights=False, **kwargs)
    model = peft.get_peft_model(base, cfg)
    model.eval()
    return model


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_checkpoint_loads_in_peftlab(arch, variant, tmp_path):
    pm = peft_model(arch, VARIANTS[variant])
    randomize_adapters(pm, seed=3)
    x = batch()
    with torch.no_grad():
        expected = pm(x).logits
    pm.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peftlab_checkpoint_loads_in_peft(arch, variant, tmp_path):
    ours = ARCHS[arch]()
    peftlab.attach(ours, peftlab.LoraConfig(target_modules=TARGETS[arch], **VARIANTS[variant]))
    randomize_adapters(ours, seed=4)
    x = batch()
    with torch.no_grad():
        expected = ours(x).logits
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_keys_and_config_fields_as_peft(arch, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, use_dora=True, bias="all", modules_to_save=["lm_head"])
    pm = peft_model(arch, kwargs)
    pm.save_pretrained(tmp_path / "peft")
    ours = ARCHS[arch]()
    peftlab.attach(ours, peftlab.LoraConfig(target_modules=TARGETS[arch], **kwargs))
    peftlab.save_adapter(ours, tmp_path / "ours")
    theirs_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    our_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert our_keys == theirs_keys
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(theirs_cfg) - {"peft_version", "auto_mapping"} <= set(our_cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_embedding_and_modules_to_save_round_trip_with_peft(arch, tmp_path):
    emb = "embed_tokens" if arch == "llama" else "wte"
    targets = TARGETS[arch][:1] + [emb]
    head = ["lm_head"] if arch == "llama" else []
    pm = peft_model(arch, dict(r=4, lora_alpha=8, modules_to_save=head), targets=targets)
    randomize_adapters(pm, seed=5)
    x = batch()
    with torch.no_grad():
        expected = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, expected, atol=2e-5, rtol=1e-4)
    peftlab.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x).logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_weight_based_inits_match_peft(init):
    torch.manual_seed(0)
    pm = peft.get_peft_model(ARCHS["llama"](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=init))
    ours = ARCHS["llama"]()
    torch.manual_seed(0)
    peftlab.attach(ours, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=init))
    q_theirs = pm.base_model.model.model.layers[0].self_attn.q_proj
    q_ours = ours.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_ours.base_layer.weight, q_theirs.base_layer.weight, atol=1e-5, rtol=1e-4)
    if init == "gaussian":  # random draws differ in order; check the distribution's scale and zero B
        assert torch.count_nonzero(q_ours.adapters["default"].lora_B.weight) == 0
        std = q_ours.adapters["default"].lora_A.weight.std().item()
        assert 0.15 < std < 0.35  # N(0, 1/r) with r=4
        return
    torch.testing.assert_close(q_ours.adapters["default"].lora_A.weight, q_theirs.lora_A["default"].weight,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q_ours.adapters["default"].lora_B.weight, q_theirs.lora_B["default"].weight,
                               atol=1e-5, rtol=1e-4)
    x = batch()
    base = ARCHS["llama"]()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, base(x).logits, atol=1e-4, rtol=1e-4)


def test_dora_merge_is_exact_and_norm_matches_dense_reference():
    from peftlab.methods.dora import dora_row_norm

    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(24, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)
    dense = (w + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora_row_norm(w, a, b, 0.7), dense, atol=1e-4, rtol=1e-5)


def test_loraplus_gives_b_matrices_ratio_times_lr():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=False))
    opt = peftlab.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16,
                                            loraplus_lr_embedding=1e-6)
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    q = model.model.layers[0].self_attn.q_proj.adapters["default"]
    n_layers = len(model.model.layers)
    assert by_lr[1e-4] == q.lora_A.weight.numel() * n_layers
    assert by_lr[1e-4 * 16] == q.lora_B.weight.numel() * n_layers
    emb = model.model.embed_tokens.adapters["default"]
    assert by_lr[1e-6] == emb.lora_embedding_A.numel() + emb.lora_embedding_B.numel()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_lora_bias_merges_where_the_base_has_a_bias_and_refuses_where_not(arch):
    ours = ARCHS[arch]()
    peftlab.attach(ours, peftlab.LoraConfig(target_modules=TARGETS[arch], r=4, lora_alpha=8, lora_bias=True))
    randomize_adapters(ours, seed=6)
    biased = [m for m in ours.modules() if hasattr(m, "adapters") and m.view.bias is not None]
    x = batch()
    with torch.no_grad():
        expected = ours(x).logits
        if len(biased) < sum(hasattr(m, "adapters") for m in ours.modules()):
            with pytest.raises(peftlab.AdapterError, match="lora_bias=True cannot merge"):
                peftlab.merge(ours)
            return
    check_merge_unmerge(ours, x, expected, atol=2e-5, rtol=1e-4)


def test_lora_bias_refusals():
    from peftlab.convert import convert_to_lora
    from peftlab.serve.store import ServeError, check_servable

    for bad in (dict(use_dora=True), dict(init_lora_weights="pissa")):
        with pytest.raises(peftlab.ConfigError, match="lora_bias=True works with plain LoRA"):
            peftlab.LoraConfig(target_modules=["q_proj"], lora_bias=True, **bad)
    with pytest.raises(peftlab.AdapterError, match="embedding LoRA has no bias"):
        peftlab.attach(ARCHS["llama"](), peftlab.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    config = peftlab.LoraConfig(target_modules=TARGETS["gpt2"], lora_bias=True)
    with pytest.raises(ServeError, match="trained biases"):
        check_servable(config, "biased")
    model = ARCHS["gpt2"]()
    peftlab.attach(model, config)
    layer = next(peftlab.adapter_layers(model))[2]
    assert layer.low_rank_factors() is None  # combine / export / hot-swap refuse it as not a plain s B A
    assert layer.param_roles()["lora_B.bias"] == "B"  # LoRA+ gives it B's learning rate
    randomize_adapters(model)
    with pytest.raises(peftlab.AdapterError, match="changes the layer's bias"):
        convert_to_lora(model, "default", rank=4)
