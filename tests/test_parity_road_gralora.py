"""RoAd and GraLoRA parity with HF PEFT (the oracle): checkpoints both ways, keys, shapes and config fields, seeded
init, merged weights, and bad settings.

PEFT adapts GPT-2's Conv1D with GraLoRA but not with RoAd, so RoAd uses Llama and NeoX (NeoX's linears have biases,
made random here, which RoAd's merge rotates too).
"""
import json

import peft
import pytest
import torch

import peftlab
from peftlab.core.inject import adapted_modules
from models import ARCHS as BASE_ARCHS
from models import (both_ways_tests, batch, check_merged_model_matches_peft, check_same_init_as_peft, logits,
                    randomize_adapters, saved_pair)

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_fc"],
}
# (peft_type, settings, architectures): settings are passed to both libraries' config classes.
CASES = {
    "road_1": ("ROAD", dict(group_size=8), ["llama", "neox"]),
    "road_2": ("ROAD", dict(variant="road_2", group_size=4), ["llama", "neox"]),
    "road_4": ("ROAD", dict(variant="road_4", group_size=16, init_weights=False), ["llama", "neox"]),
    "gralora": ("GRALORA", dict(r=4, alpha=8), ["llama", "gpt2"]),
    "gralora_hybrid": ("GRALORA", dict(r=8, gralora_k=4, hybrid_r=2, alpha=12, init_weights=False),
                       ["llama", "gpt2"]),
    "gralora_bias": ("GRALORA", dict(r=4, hybrid_r=4, gralora_dropout=0.1, bias="gralora_only"), ["neox"]),
    "gralora_bias_all": ("GRALORA", dict(r=2, gralora_k=2, bias="all"), ["neox"]),
}


def neox_with_biases(seed: int = 0):
    """The tiny NeoX with random (not zero) biases, so that merging RoAd's rotation into them is checked."""
    model = BASE_ARCHS["neox"](seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


ARCHS = {**BASE_ARCHS, "neox": neox_with_biases}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"ROAD": peft.RoadConfig, "GRALORA": peft.GraloraConfig}


def settings(case, arch):
    peft_type, kwargs, _ = CASES[case]
    return peft_type, dict(kwargs, target_modules=TARGETS[arch])


def our_config(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peftlab.lookup(peft_type).config(**kwargs)


def peft_model(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](**kwargs)).eval()


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, our_config, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = CASES[case][2][0]
    peft_model(case, arch).save_pretrained(tmp_path / "peft")
    ours = ARCHS[arch]()
    peftlab.attach(ours, our_config(case, arch))
    peftlab.save_adapter(ours, tmp_path / "ours")
    _, _, ours_cfg, theirs_cfg = saved_pair(tmp_path)  # asserts the same keys and shapes
    assert set(ours_cfg) == set(theirs_cfg) - {"peft_version", "auto_mapping"}
    for key in set(ours_cfg) - {"task_type", "target_modules", "inference_mode"}:
        assert ours_cfg[key] == theirs_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    config = our_config(case, CASES[case][2][0])
    again = peftlab.config_from_dict(json.loads(config.to_json()))
    assert again == config and type(again) is type(config)
    theirs = peft.PeftConfig.from_peft_type(**config.to_dict())
    assert theirs.peft_type == config.peft_type


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_gives_peft_s_initial_weights(case):
    """PEFT draws its random inits (RoAd with init_weights=False, GraLoRA's Kaiming A) from the global generator in
    module order, as we do, so the same seed gives the same tensors."""
    peft_type, kwargs = settings(case, CASES[case][2][0])
    arch = CASES[case][2][0]
    base = ARCHS[arch]()
    torch.manual_seed(7)
    pm = peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](**kwargs))
    torch.manual_seed(7)
    ours = peftlab.attach(ARCHS[arch](), our_config(case, arch))
    check_same_init_as_peft(pm, ours)
    if kwargs.get("init_weights", True):  # identity at init, as PEFT's
        x = batch()
        torch.testing.assert_close(logits(ours, x), logits(base, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_merged_weights_and_biases_match_peft(case, arch, tmp_path):
    check_merged_model_matches_peft(peft_model(case, arch), ARCHS[arch], tmp_path)


def test_road_unmerge_restores_weights_and_bias():
    model = ARCHS["neox"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.attach(model, peftlab.RoadConfig(variant="road_4", group_size=8, init_weights=False,
                                             target_modules=TARGETS["neox"]))
    peftlab.merge(model)
    assert not torch.equal(model.gpt_neox.layers[0].attention.dense.base_layer.bias,
                           before["gpt_neox.layers.0.attention.dense.bias"])
    peftlab.unmerge(model)
    for name, module in adapted_modules(model):
        for part in ("weight", "bias"):
            torch.testing.assert_close(getattr(module.base_layer, part), before[f"{name}.{part}"], atol=1e-5,
                                       rtol=1e-5, msg=f"{name}.{part}")


def test_road_on_gpt2_conv1d_merges_to_the_same_output():
    """PEFT's RoAd takes nn.Linear only; ours also wraps GPT-2's Conv1D ((in, out) weights) through BaseView."""
    model = ARCHS["gpt2"]()
    peftlab.attach(model, peftlab.RoadConfig(variant="road_2", group_size=8, target_modules=TARGETS["gpt2"]))
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(ARCHS["gpt2"](), x), atol=1e-3)
    torch.testing.assert_close(logits(peftlab.merge_and_unload(model), x), expected, atol=1e-5, rtol=1e-4)


BAD = [
    ("ROAD", dict(variant="road_3"), "variant"),
    ("ROAD", dict(group_size=7), "group_size"),
    ("ROAD", dict(group_size=0), "group_size"),
    ("ROAD", dict(init_weights="yes"), "init_weights"),
    ("GRALORA", dict(r=0), "r must be a positive integer"),
    ("GRALORA", dict(r=6, gralora_k=4), "r must be divisible by gralora_k"),
    ("GRALORA", dict(gralora_k=0), "gralora_k must be a positive integer"),
    ("GRALORA", dict(hybrid_r=-1), "hybrid_r must be a non-negative integer"),
    ("GRALORA", dict(gralora_dropout=1.0), "gralora_dropout"),
    ("GRALORA", dict(bias="lora_only"), "bias"),
    ("GRALORA", dict(alpha="big"), "alpha"),
]


@pytest.mark.parametrize("peft_type,kwargs,message", BAD)
def test_bad_settings_name_the_field(peft_type, kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


def test_road_group_size_that_does_not_divide_a_layer_names_it():
    with pytest.raises(peftlab.ConfigError, match=r"v_proj.*out_features 16.*group_size=32"):
        peftlab.attach(ARCHS["llama"](), peftlab.RoadConfig(group_size=32, target_modules=["q_proj", "v_proj"]))


def test_gralora_blocks_that_do_not_divide_a_layer_name_it():
    with pytest.raises(peftlab.ConfigError, match=r"q_proj.*in_features 32.*gralora_k=3"):
        peftlab.attach(ARCHS["llama"](), peftlab.GraloraConfig(r=6, gralora_k=3, target_modules=["q_proj"]))


def test_unknown_keys_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'r'"):
        peftlab.config_from_dict({"peft_type": "ROAD", "target_modules": ["q_proj"], "r": 8})
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "GRALORA", "target_modules": ["q_proj"], "lora_alpha": 8})


def test_gralora_block_maths_equals_its_dense_weight():
    """The forward's routing (chunk j of input block n to output block j) and the merged weight agree, and each of
    the k x k blocks of the weight has rank r / k."""
    from peftlab.methods.gralora import gralora_out, gralora_weight

    g = torch.Generator().manual_seed(0)
    k, r, n_in, n_out = 3, 6, 12, 9
    a, b = torch.randn(k, n_in // k, r, generator=g), torch.randn(k, r, n_out // k, generator=g)
    x = torch.randn(2, 5, n_in, generator=g)
    weight = gralora_weight(a, b)
    torch.testing.assert_close(gralora_out(x, a, b), x @ weight.t(), atol=1e-5, rtol=1e-5)
    for j in range(k):
        for n in range(k):
            block = weight[j * 3:(j + 1) * 3, n * 4:(n + 1) * 4]
            assert torch.linalg.matrix_rank(block) == r // k


@pytest.mark.parametrize("case", ["road_2", "gralora_hybrid"])
def test_inspect_groups_each_layer_s_tensors_under_its_module(case, tmp_path):
    from peftlab.inspect import describe_adapter

    arch = CASES[case][2][0]
    ours = peftlab.attach(ARCHS[arch](), our_config(case, arch))
    peftlab.save_adapter(ours, tmp_path)
    info = describe_adapter(tmp_path)
    assert info["adapted_modules"] == 2 * len(TARGETS[arch])  # two decoder layers
    expected = {"road_2": {"road_theta", "road_alpha"},
                "gralora_hybrid": {"gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"}}
    assert all(set(suffixes) == expected[case] for suffixes in info["modules"].values())


@pytest.mark.parametrize("case,arch", [("gralora", "gpt2"), ("gralora_hybrid", "llama"), ("gralora_bias", "neox")])
def test_gralora_fused_path_equals_the_reference(case, arch, monkeypatch):
    """The fused LoRA node over gralora_factors (block-diagonal A, routed B, hybrid pair appended) gives the
    reference path's loss and every gradient."""
    from models import losses_and_grads_by_fast_flag

    from peftlab.methods.gralora import gralora_factors, gralora_weight

    model = peftlab.attach(ARCHS[arch](), our_config(case, arch))
    randomize_adapters(model)
    layer = next(m for m in model.modules() if isinstance(m, peftlab.AdaptedModule)).adapters["default"]
    down, up = gralora_factors(layer.gralora_A, layer.gralora_B)
    torch.testing.assert_close(up @ down, gralora_weight(layer.gralora_A, layer.gralora_B), atol=1e-6, rtol=1e-5)
    (ref_loss, ref_grads), (loss, grads) = losses_and_grads_by_fast_flag(model, batch(), monkeypatch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("gralora_A" in k for k in grads)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4, msg=key)
