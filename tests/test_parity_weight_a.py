"""IA3 / VeRA / LoHa / LoKr parity with HF PEFT (the oracle), both directions, keys, configs, bad input.

PEFT adapts GPT-2's Conv1D with IA3 and VeRA but not with LoHa / LoKr, so those use Llama and NeoX.
"""
import json

import peft
import pytest
import torch

import peftlab
from models import ARCHS, both_ways_tests, check_config_round_trip, check_same_file_as_peft

TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "neox": dict(target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "gpt2": dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"]),
}
FEEDFORWARD = {"llama": ["down_proj"], "neox": ["dense_4h_to_h"], "gpt2": ["mlp.c_proj"]}
VTAIL = "v_proj|query_key_value|c_attn"  # a rank/alpha pattern key per architecture

# (peft_type, settings, architectures): settings are passed to both libraries' config classes.
CASES = {
    "ia3": ("IA3", {}, ["llama", "neox", "gpt2"]),
    "vera": ("VERA", dict(r=8, projection_prng_key=3, d_initial=0.2), ["llama", "neox", "gpt2"]),
    "vera_no_projection": ("VERA", dict(r=4, save_projection=False), ["llama", "gpt2"]),
    "loha": ("LOHA", dict(r=4, alpha=6), ["llama", "neox"]),
    "loha_patterns": ("LOHA", dict(r=4, alpha=8, rank_pattern={VTAIL: 2}, alpha_pattern={VTAIL: 3}), ["llama"]),
    "lokr": ("LOKR", dict(r=4, alpha=8), ["llama", "neox"]),
    "lokr_low_rank_w2": ("LOKR", dict(r=2, alpha=4, rank_pattern={VTAIL: 1}), ["llama", "neox"]),
    "lokr_decompose_both": ("LOKR", dict(r=1, alpha=2, decompose_both=True, decompose_factor=4), ["llama", "neox"]),
}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"IA3": peft.IA3Config, "VERA": peft.VeraConfig, "LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig}


def settings(case, arch):
    peft_type, kwargs, _ = CASES[case]
    kwargs = dict(kwargs, **TARGETS[arch])
    if peft_type == "IA3":
        kwargs["feedforward_modules"] = FEEDFORWARD[arch]
    return peft_type, kwargs


def ours_config(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peftlab.lookup(peft_type).config(**kwargs)


def peft_model(case, arch):
    peft_type, kwargs = settings(case, arch)
    model = peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](**kwargs))
    return model.eval()


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = CASES[case][2][0]
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    check_same_file_as_peft(peft_model(case, arch), ours, tmp_path,
                            unchecked=("task_type", "target_modules", "feedforward_modules"))


def test_vera_projections_are_peft_s_for_the_same_key():
    pm = peft_model("vera", "llama")
    ours = ARCHS["llama"]()
    peftlab.attach(ours, ours_config("vera", "llama"))
    shared = peftlab.core.inject.model_state(ours).shared["default"]
    assert torch.equal(shared.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, pm.base_model.vera_B["default"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    check_config_round_trip(ours_config(case, CASES[case][2][0]))


@pytest.mark.parametrize("peft_type,kwargs,match", [
    ("IA3", dict(target_modules=["q_proj"], feedforward_modules=["down_proj"]), "subset of target_modules"),
    ("IA3", dict(target_modules=["q_proj"], init_ia3_weights="yes"), "init_ia3_weights"),
    ("VERA", dict(target_modules=["q_proj"], r=0), "r must be a positive integer"),
    ("VERA", dict(target_modules=["q_proj"], vera_dropout=1.0), "vera_dropout"),
    ("VERA", dict(target_modules=["q_proj"], projection_prng_key="seven"), "projection_prng_key"),
    ("LOHA", dict(target_modules=["q_proj"], rank_dropout=1.5), "rank_dropout"),
    ("LOHA", dict(target_modules=["q_proj"], init_weights="lycoris"), "init_weights"),
    ("LOHA", dict(target_modules=["q_proj"], rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
    ("LOKR", dict(target_modules=["q_proj"], decompose_factor=0), "decompose_factor"),
    ("LOKR", dict(target_modules=["q_proj"], module_dropout=-0.1), "module_dropout"),
    ("LOKR", dict(target_modules=["q_proj"], r=2.5), "r must be a positive integer"),
    ("TIED_LORA", dict(target_modules=["q_proj"], lora_dropout=1.0), "lora_dropout"),
])
def test_bad_settings_name_the_field(peft_type, kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.lookup(peft_type).config(**kwargs)


def test_unsupported_peft_options_and_unknown_keys_are_refused():
    with pytest.raises(peftlab.ConfigError, match="bias='vera_only' is not supported"):
        peftlab.config_from_dict({"peft_type": "VERA", "target_modules": ["q_proj"], "bias": "vera_only"})
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "LOHA", "target_modules": ["q_proj"], "lora_alpha": 8})


def test_vera_checkpoint_without_its_projections_is_refused(tmp_path):
    pm = peft_model("vera_no_projection", "llama")
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, save_projection=True)))
    model = ARCHS["llama"]()
    with pytest.raises(peftlab.CheckpointError, match=r"missing \['base_model.vera_A', 'base_model.vera_B'\]"):
        peftlab.load_adapter(model, tmp_path)
    assert not peftlab.list_adapters(model)  # left as it was


def test_vera_cannot_adapt_an_embedding():
    with pytest.raises(peftlab.AdapterError, match="VeraLayer cannot adapt 'model.embed_tokens'"):
        peftlab.attach(ARCHS["llama"](), peftlab.VeraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
