"""RandLoRA / DeLoRA parity with HF PEFT (the oracle): both directions, keys, configs, seeded init, bad input.

PEFT adapts GPT-2's Conv1D with RandLoRA but not with DeLoRA, so DeLoRA uses Llama and NeoX. The Llama targets mix
in < out (up_proj), in > out (k_proj, down_proj) and square (q_proj) layers: RandLoRA scales the bases of the
smaller side, so each orientation takes another branch.
"""
import json

import peft
import pytest
import torch

import peftlab
from models import (
    ARCHS, ParityCases, batch, both_ways_tests, check_config_round_trip, check_same_file_as_peft, logits,
    randomize_adapters,
)
from peftlab.core.inject import adapter_layers, model_state

TARGETS = {
    "llama": dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]),
    "neox": dict(target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "gpt2": dict(target_modules=["c_attn", "mlp.c_proj"]),
}
VTAIL = "k_proj|query_key_value"  # a pattern key per architecture

# (peft_type, settings, architectures): settings are passed to both libraries' config classes.
CASES = {
    "randlora": ("RANDLORA", dict(r=8, projection_prng_key=3, randlora_alpha=40), ["llama", "gpt2"]),
    "randlora_sparse": ("RANDLORA", dict(r=4, sparse=True, randlora_alpha=16), ["llama"]),
    "randlora_very_sparse_no_projection": ("RANDLORA", dict(r=8, very_sparse=True, save_projection=False),
                                           ["llama", "gpt2"]),
    "randlora_bias_all_conv1d": ("RANDLORA", dict(r=16, bias="all", fan_in_fan_out=True), ["gpt2"]),
    "delora": ("DELORA", dict(r=4, delora_lambda=6), ["llama", "neox"]),
    "delora_bias_all": ("DELORA", dict(r=2, bias="all", init_weights=False), ["neox"]),
    "delora_bias_only": ("DELORA", dict(r=2, bias="delora_only", init_weights=False), ["neox"]),
    "randlora_bias_only": ("RANDLORA", dict(r=8, randlora_alpha=16, bias="randlora_only"), ["neox"]),
    "delora_patterns": ("DELORA", dict(r=4, rank_pattern={VTAIL: 2}, lambda_pattern={VTAIL: 3.5}), ["llama", "neox"]),
}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"RANDLORA": peft.RandLoraConfig, "DELORA": peft.DeloraConfig}


PARITY = ParityCases({case: (*entry, {arch: t["target_modules"] for arch, t in TARGETS.items()})
                      for case, entry in CASES.items()}, ARCHS, PEFT_CONFIGS)
settings, ours_config, peft_model = PARITY.settings, PARITY.ours, PARITY.peft_model


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = CASES[case][2][0]
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    check_same_file_as_peft(peft_model(case, arch), ours, tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
@pytest.mark.parametrize("init_weights", [True, False])
def test_same_seed_gives_peft_s_initial_adapter(case, arch, init_weights):
    """The same global seed before attaching gives PEFT's trainable tensors and frozen bases / norms, and its
    outputs; with init_weights=False the adapter already changes the model."""
    torch.manual_seed(7)
    theirs = peft_model(case, arch, init_weights=init_weights)
    torch.manual_seed(7)
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch, init_weights=init_weights))
    ours_state = peftlab.core.state.adapter_tensors(ours, "default")
    theirs_state = peft.get_peft_model_state_dict(theirs)
    module_keys = {k for k in theirs_state if k.startswith("base_model.model.")}  # the shared bases aside
    assert {f"base_model.model.{k}" for k in ours_state} == module_keys
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[f"base_model.model.{key}"]), key
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)  # as in models.py


@pytest.mark.parametrize("case", ["randlora", "randlora_sparse", "randlora_very_sparse_no_projection"])
def test_randlora_bases_are_peft_s_for_the_same_key(case):
    arch = CASES[case][2][0]
    theirs = peft_model(case, arch).base_model
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    shared = model_state(ours).shared["default"]
    assert torch.equal(shared.randlora_A, theirs.randlora_A["default"])
    assert torch.equal(shared.randlora_B, theirs.randlora_B["default"])
    assert shared.randlora_A.shape[:2] == (CASES[case][1]["r"], 1)  # one rank-r slice, scaled per basis


def test_randlora_bases_are_frozen_shared_and_regenerated_from_the_key(tmp_path):
    config = ours_config("randlora_very_sparse_no_projection", "llama")
    model = ARCHS["llama"]()
    peftlab.attach(model, config)
    shared = model_state(model).shared["default"]
    assert not any(b is shared.randlora_A or b is shared.randlora_B for b in model.parameters())
    assert all(layer.shared is shared for _, _, layer in adapter_layers(model))
    randomize_adapters(model)
    x = batch()
    peftlab.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is False
    fresh = ARCHS["llama"]()
    peftlab.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), logits(model, x))
    other = ARCHS["llama"]()
    peftlab.load_adapter(other, tmp_path, projection_prng_key=1)  # another key: other bases, another model
    assert not torch.allclose(logits(other, x), logits(model, x), atol=1e-4)


@pytest.mark.parametrize("case", ["randlora", "delora", "delora_patterns"])
def test_merged_weight_is_peft_s(case):
    """delta_weight (what merging adds) equals PEFT's get_delta_weight on every layer, both orientations."""
    arch = CASES[case][2][0]
    theirs = peft_model(case, arch)
    randomize_adapters(theirs, seed=5)
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    ours_state = peftlab.core.state.adapter_tensors(ours, "default")
    theirs_state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for key, value in ours_state.items():
            value.copy_(theirs_state[f"base_model.model.{key}"])
    modules = dict(theirs.base_model.model.named_modules())
    for module_name, _, layer in adapter_layers(ours):
        torch.testing.assert_close(layer.delta_weight(), modules[module_name].get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-5)


def test_delora_update_norm_is_bounded_by_lambda():
    """||ΔW||_F <= λ max_j ||W0[:, j]||, however large A and B grow (the decoupling DeLoRA is named for)."""
    model = ARCHS["llama"]()
    peftlab.attach(model, ours_config("delora", "llama"))
    randomize_adapters(model, std=100.0)
    for _, _, layer in adapter_layers(model):
        bound = layer.delora_lambda.abs() * layer.delora_w_norm.max()
        assert layer.delta_weight().norm() <= bound * (1 + 1e-5)


def test_delora_w_norm_is_the_base_column_norm_and_fixed():
    model = ARCHS["llama"]()
    peftlab.attach(model, ours_config("delora", "llama"))
    for _, _, layer in adapter_layers(model):
        assert "delora_w_norm" in dict(layer.named_buffers())
        assert not layer.delora_w_norm.requires_grad
    layer = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(layer.adapters["default"].delora_w_norm, layer.base_layer.weight.norm(dim=0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    check_config_round_trip(ours_config(case, CASES[case][2][0]))


@pytest.mark.parametrize("peft_type,kwargs,match", [
    ("RANDLORA", dict(r=0), "r must be a positive integer"),
    ("RANDLORA", dict(r=2.5), "r must be a positive integer"),
    ("RANDLORA", dict(randlora_dropout=1.0), "randlora_dropout"),
    ("RANDLORA", dict(projection_prng_key="seven"), "projection_prng_key"),
    ("RANDLORA", dict(randlora_alpha="big"), "randlora_alpha"),
    ("RANDLORA", dict(bias="lora_only"), "bias must be one of .*'randlora_only'"),
    ("RANDLORA", dict(bias="some"), "bias must be"),
    ("DELORA", dict(r=-1), "r must be a positive integer"),
    ("DELORA", dict(delora_lambda=float("nan")), "delora_lambda"),
    ("DELORA", dict(module_dropout=-0.1), "module_dropout"),
    ("DELORA", dict(bias="lora_only"), "bias must be one of .*'delora_only'"),
    ("DELORA", dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
    ("DELORA", dict(lambda_pattern={"q_proj": "x"}), r"lambda_pattern\['q_proj'\]"),
])
def test_bad_settings_name_the_field(peft_type, kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


def test_unknown_keys_and_unsupported_bias_in_files_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "DELORA", "target_modules": ["q_proj"], "lora_alpha": 8})
    with pytest.raises(peftlab.ConfigError, match="bias must be one of .*'randlora_only'.*got 'delora_only'"):
        peftlab.config_from_dict({"peft_type": "RANDLORA", "target_modules": ["q_proj"], "bias": "delora_only"})


def test_randlora_checkpoint_without_its_bases_is_refused(tmp_path):
    peft_model("randlora_very_sparse_no_projection", "llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, save_projection=True)))
    model = ARCHS["llama"]()
    with pytest.raises(peftlab.CheckpointError, match="missing"):
        peftlab.load_adapter(model, tmp_path)
    assert not peftlab.list_adapters(model)  # left as it was


def test_randlora_file_with_per_layer_copies_of_the_bases_loads(tmp_path):
    """PEFT before 0.22 saved the shared bases under every layer's keys as well as at ``base_model.``: such a file
    loads with the same logits, and one whose copy differs from the model-level bases is refused naming the key."""
    from safetensors.torch import load_file, save_file

    ours = ARCHS["llama"]()
    peftlab.attach(ours, ours_config("randlora", "llama"))
    randomize_adapters(ours, seed=2)
    ours.eval()
    peftlab.save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".randlora_lambda")})
    copies = {f"{layer}.{leaf}": tensors[f"base_model.{leaf}"].clone() for layer in layers
              for leaf in ("randlora_A", "randlora_B")}
    save_file({**tensors, **copies}, path)
    again = ARCHS["llama"]()
    peftlab.load_adapter(again, tmp_path)
    again.eval()
    x = batch()
    torch.testing.assert_close(logits(again, x), logits(ours, x))
    bad = next(iter(copies))
    copies[bad] = copies[bad] + 1
    save_file({**tensors, **copies}, path)
    with pytest.raises(peftlab.CheckpointError, match="randlora_"):
        peftlab.load_adapter(ARCHS["llama"](), tmp_path)


@pytest.mark.parametrize("peft_type", ["RANDLORA", "DELORA"])
def test_cannot_adapt_an_embedding(peft_type):
    config = peftlab.lookup(peft_type).config(r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(peftlab.AdapterError, match="cannot adapt 'model.embed_tokens'"):
        peftlab.attach(ARCHS["llama"](), config)


@pytest.mark.parametrize("case", ["randlora", "delora_patterns"])
def test_fused_path_matches_reference(case, monkeypatch):
    """The fused low-rank node (PEFTLAB_FAST=1, CUDA's default) gives the reference path's loss and gradients."""
    from models import check_fast_path_matches_reference

    model = ARCHS["llama"]()
    peftlab.attach(model, ours_config(case, "llama"))
    randomize_adapters(model)
    check_fast_path_matches_reference(model, batch(), monkeypatch)
