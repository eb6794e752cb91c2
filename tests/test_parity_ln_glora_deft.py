"""LN tuning, GLoRA and DEFT parity with HF PEFT (the oracle): checkpoints both ways, keys, shapes and config fields,
seeded init, merged weights, and bad settings.

PEFT's GLoRA takes plain nn.Linear only, so it runs on Llama and on NeoX (whose linears have biases, made random here,
for the C, D and E paths); LN tuning and DEFT also run on GPT-2 (LayerNorms with biases; Conv1D).
"""
import peft
import pytest
import torch

import peftlab
from peftlab.core.inject import adapted_modules
from peftlab.methods.ln_tuning import NORM_TARGETS
from models import ARCHS as BASE_ARCHS
from models import (ParityCases, batch, both_ways_tests, check_config_round_trip, check_merge_unmerge,
                    check_merged_model_matches_peft, check_same_file_as_peft, check_same_init_as_peft, logits,
                    randomize_adapters, saved_pair)

LINEAR_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_fc"],
}
NORMS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "neox": ["input_layernorm", "post_attention_layernorm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
}
# (peft_type, settings, architectures, targets by architecture): settings go to both libraries' config classes.
CASES = {
    "ln": ("LN_TUNING", {}, ["llama", "gpt2"], NORMS),
    "ln_regex": ("LN_TUNING", {}, ["neox"], {"neox": NORM_TARGETS}),
    "glora": ("GLORA", dict(r=4), ["llama", "neox"], LINEAR_TARGETS),
    "glora_vector": ("GLORA", dict(config_A_B="vector", config_C="vector", config_D_E="vector", init_weights=False),
                     ["neox"], LINEAR_TARGETS),
    "glora_mixed": ("GLORA", dict(r=2, config_A_B="constant", config_C="lora", config_D_E="none", bias="glora_only"),
                    ["neox", "llama"], LINEAR_TARGETS),
    "glora_none": ("GLORA", dict(config_A_B="none", config_C="none", config_D_E="constant"), ["neox"],
                   LINEAR_TARGETS),
    "deft": ("DEFT", dict(r=4), ["llama", "neox"], LINEAR_TARGETS),
    "deft_gpt2": ("DEFT", dict(r=4, alpha=8, fan_in_fan_out=True), ["gpt2"], LINEAR_TARGETS),
    "deft_qr": ("DEFT", dict(r=6, decomposition_method="qr", deft_dropout=0.1, bias="deft_only"), ["neox", "llama"],
                LINEAR_TARGETS),
    "deft_random": ("DEFT", dict(r=4, init_weights=False, init_scale=2.0, alpha=16), ["llama"], LINEAR_TARGETS),
    "deft_para": ("DEFT", dict(r=40, para=True), ["llama"], LINEAR_TARGETS),
}


def with_biases(make):
    """``make``'s model with random (not zero / one) biases and norm scales, so that every path touching them is
    checked."""
    def build(seed: int = 0):
        model = make(seed)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") or (p.dim() == 1 and "norm" in name or ".ln_" in name):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return model
    return build


ARCHS = {name: with_biases(make) for name, make in BASE_ARCHS.items()}
PARITY = ParityCases(CASES, ARCHS, {"LN_TUNING": peft.LNTuningConfig, "GLORA": peft.GloraConfig,
                                    "DEFT": peft.DeftConfig})


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PARITY.pairs, PARITY.peft_model, PARITY.ours, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = PARITY.first_arch(case)
    ours = peftlab.attach(ARCHS[arch](), PARITY.ours(case, arch))
    check_same_file_as_peft(PARITY.peft_model(case, arch), ours, tmp_path)
    _, _, ours_cfg, theirs_cfg = saved_pair(tmp_path)
    ours_targets, theirs_targets = ours_cfg["target_modules"], theirs_cfg["target_modules"]
    if isinstance(ours_targets, list):  # PEFT keeps a list of names as a set
        ours_targets, theirs_targets = sorted(ours_targets), sorted(theirs_targets)
    assert ours_targets == theirs_targets


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    check_config_round_trip(PARITY.ours(case, PARITY.first_arch(case)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_gives_peft_s_initial_weights(case):
    """PEFT draws its random inits (GLoRA's Kaiming Xu, DEFT's N(0, 0.02) P) from the global generator in module
    order, as we do, so the same seed gives the same tensors (DEFT's R follows from P and W0, within rounding of the
    float32 products); LN tuning copies the norms."""
    arch = PARITY.first_arch(case)
    torch.manual_seed(7)
    theirs = PARITY.peft_model(case, arch)
    torch.manual_seed(7)
    ours = peftlab.attach(ARCHS[arch](), PARITY.ours(case, arch))
    check_same_init_as_peft(theirs, ours, atol=1e-7, rtol=1e-6)
    kwargs = CASES[case][1]
    if kwargs.get("init_weights", True) and not kwargs.get("para"):  # identity at init, as PEFT's
        x, base = batch(), ARCHS[arch]()
        torch.testing.assert_close(logits(ours, x), logits(base, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(theirs, x), logits(base, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,arch", PARITY.pairs)
def test_merged_weights_and_biases_match_peft(case, arch, tmp_path):
    check_merged_model_matches_peft(PARITY.peft_model(case, arch), ARCHS[arch], tmp_path)


@pytest.mark.parametrize("case,arch", [("ln", "gpt2"), ("glora_vector", "neox"), ("deft_qr", "neox"),
                                       ("deft_para", "llama")])
def test_unmerge_restores_weights_and_biases(case, arch):
    model = peftlab.attach(ARCHS[arch](), PARITY.ours(case, arch))
    randomize_adapters(model, seed=2)  # also the targets' own biases where they train (bias="deft_only")
    before = {f"{name}.{part}": getattr(module.base_layer, part).detach().clone()
              for name, module in adapted_modules(model) for part in ("weight", "bias")
              if getattr(module.base_layer, part, None) is not None}
    x = batch()
    expected = logits(model, x)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-4)
    peftlab.unmerge(model)
    for name, module in adapted_modules(model):
        for part in ("weight", "bias"):
            if f"{name}.{part}" in before:
                torch.testing.assert_close(getattr(module.base_layer, part), before[f"{name}.{part}"], atol=1e-5,
                                           rtol=1e-5, msg=f"{name}.{part}")
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-4)



def test_two_active_deft_adapters_merge_to_their_composed_forward():
    """Two DEFT adapters active at once compose (the second removes its subspace from the first's output), and
    merging both, one after the other, gives that same output."""
    model = ARCHS["neox"]()
    for name, case in (("a", "deft"), ("b", "deft_qr")):
        peftlab.attach(model, PARITY.ours(case, "neox").replace(deft_dropout=0.0, bias="none"), name=name)
    peftlab.set_active(model, ["a", "b"])
    randomize_adapters(model, seed=3)
    x = batch()
    expected = logits(model, x)
    with peftlab.disabled(model):
        assert not torch.allclose(logits(model, x), expected, atol=1e-3)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)

def test_ln_tuning_default_config_targets_every_norm_and_only_norms():
    for arch, make in BASE_ARCHS.items():
        model = peftlab.attach(make(), peftlab.variants()["ln_tuning"](["q_proj"], 4))
        wrapped = [name.rsplit(".", 1)[-1] for name, _ in adapted_modules(model)]
        expected = {"llama": NORMS["llama"], "qwen2": NORMS["llama"], "gpt2": NORMS["gpt2"], "neox": NORMS["neox"]}
        assert set(wrapped) == set(expected[arch]), arch
        assert len(wrapped) == 2 * 2 + 1


def test_ln_tuning_refuses_linear_targets_and_others_refuse_norms():
    with pytest.raises(peftlab.AdapterError, match=r"q_proj.*\(linear\); supports \['norm'\]"):
        peftlab.attach(BASE_ARCHS["llama"](), peftlab.LNTuningConfig(target_modules=["q_proj"]))
    with pytest.raises(peftlab.AdapterError, match=r"input_layernorm.*\(norm\); supports \['linear'\]"):
        peftlab.attach(BASE_ARCHS["llama"](), peftlab.GloraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(peftlab.AdapterError, match=r"input_layernorm.*\(norm\)"):
        peftlab.attach(BASE_ARCHS["llama"](), peftlab.LoraConfig(target_modules=["input_layernorm"]))


def test_ln_tuning_is_not_converted_or_served_as_a_lora():
    from peftlab.convert import adapter_updates
    from peftlab.serve.store import ServeError, forms_of

    model = peftlab.attach(BASE_ARCHS["llama"](), peftlab.variants()["ln_tuning"](None, 4))
    with pytest.raises(peftlab.AdapterError, match="norm layer.*not an \\(out, in\\) matrix"):
        adapter_updates(model, "default")
    with pytest.raises(ServeError, match="no batched serving form"):
        forms_of(model, "default", 8)


def test_inspect_groups_ln_tuning_tensors_under_each_norm(tmp_path):
    from peftlab.inspect import describe_adapter

    peftlab.save_adapter(peftlab.attach(ARCHS["gpt2"](), PARITY.ours("ln", "gpt2")), tmp_path)
    info = describe_adapter(tmp_path)
    assert info["adapted_modules"] == 5
    assert all(set(s) == {"ln_tuning_layers.weight", "ln_tuning_layers.bias"} for s in info["modules"].values())


def test_deft_rank_is_capped_at_out_features_like_peft():
    model = peftlab.attach(BASE_ARCHS["llama"](), peftlab.DeftConfig(r=40, target_modules=["v_proj"]))
    layer = model.model.layers[0].self_attn.v_proj.adapters["default"]
    assert layer.deft_P.shape == (16, 16) and layer.deft_R.shape == (16, 32)


BAD = [
    ("GLORA", dict(r=0), "r must be a positive integer"),
    ("GLORA", dict(config_A_B="full"), "config_A_B"),
    ("GLORA", dict(config_C="constant"), "config_C"),
    ("GLORA", dict(config_D_E="lora"), "config_D_E"),
    ("GLORA", dict(bias="lora_only"), "bias"),
    ("GLORA", dict(init_weights="yes"), "init_weights"),
    ("DEFT", dict(r=-2), "r must be a positive integer"),
    ("DEFT", dict(decomposition_method="svd"), "decomposition_method"),
    ("DEFT", dict(deft_dropout=1.5), "deft_dropout"),
    ("DEFT", dict(alpha="big"), "alpha"),
    ("DEFT", dict(para=1), "para"),
    ("DEFT", dict(bias="lora_only"), "bias"),
    ("DEFT", dict(layers_pattern="layers"), "layers_pattern"),
]


@pytest.mark.parametrize("peft_type,kwargs,message", BAD)
def test_bad_settings_name_the_field(peft_type, kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'r'"):
        peftlab.config_from_dict({"peft_type": "LN_TUNING", "target_modules": ["norm"], "r": 8})
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "GLORA", "target_modules": ["q_proj"], "lora_alpha": 8})
    with pytest.raises(peftlab.ConfigError, match="regex"):
        peftlab.DeftConfig(target_modules=".*q_proj", layers_to_transform=[0])
