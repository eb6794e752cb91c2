"""Super-Tuning parity with HF PEFT (the oracle): both directions, keys, configs, the magnitude support and initial
weights drawn from the same seed, gradients, merged weights, indices left out of the file, bad input.

PEFT adapts ``nn.Linear`` only, so Llama and NeoX are compared; GPT-2's Conv1D is adapted here only.
"""
import peft
import pytest
import torch

import peftlab
from peftlab.core.inject import adapter_layers
from models import (ARCHS, batch, check_merge_unmerge, check_peft_file_loads_in_peftlab,
                    check_peftlab_file_loads_in_peft, check_same_logits_gradients_and_merge_as_peft,
                    check_same_seeded_save_as_peft, logits, randomize_adapters)

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
}
CASES = {
    "super": (dict(sparsity=0.9), ["llama", "neox"]),
    "super_default_bottom": (dict(select_top=False), ["llama"]),
    "super_random_init": (dict(sparsity=0.8, init_weights=False), ["llama"]),
    "supra": (dict(sparsity=0.95, r=4), ["llama", "neox"]),
    "supra_alpha_dropout_random": (dict(sparsity=0.9, r=2, lora_alpha=5, lora_dropout=0.1, init_weights=False),
                                   ["llama"]),
    "supra_indices_not_saved": (dict(sparsity=0.9, r=3, select_top=False, save_precomputed_indices=False),
                                ["llama", "neox"]),
}
PAIRS = [(case, arch) for case, (_, archs) in CASES.items() for arch in archs]


def settings(case, arch):
    return dict(CASES[case][0], target_modules=TARGETS[arch])


def peft_model(case, arch):
    return peft.get_peft_model(ARCHS[arch](), peft.SupertuningConfig(**settings(case, arch))).eval()


def our_model(case, arch):
    model = ARCHS[arch]().eval()
    peftlab.attach(model, peftlab.SupertuningConfig(**settings(case, arch)))
    return model


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peft_checkpoint_loads_in_peftlab(case, arch, tmp_path):
    check_peft_file_loads_in_peftlab(peft_model(case, arch), ARCHS[arch], tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peftlab_checkpoint_loads_in_peft(case, arch, tmp_path):
    check_peftlab_file_loads_in_peft(ARCHS[arch], peftlab.SupertuningConfig(**settings(case, arch)), tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_keys_shapes_config_support_and_initial_weights_as_peft(case, arch, tmp_path):
    """Built from the same global seed, both libraries save the same tensors (support, values, LoRA draws) under the
    same keys and dtypes (int32 indices), with the same config fields and values (lora_alpha's 2 r default too)."""
    _, theirs = check_same_seeded_save_as_peft(lambda: peft_model(case, arch), lambda: our_model(case, arch), tmp_path)
    saves_indices = CASES[case][0].get("save_precomputed_indices", True)
    assert any(key.endswith("supertuning_indices") for key in theirs) == saves_indices


@pytest.mark.parametrize("case,arch", [("super_random_init", "llama"), ("supra", "neox"),
                                       ("supra_indices_not_saved", "llama")])
def test_same_logits_gradients_and_merged_weights_as_peft(case, arch):
    torch.manual_seed(1)
    theirs = peft_model(case, arch)
    torch.manual_seed(1)
    ours = our_model(case, arch)
    randomize_adapters(theirs, seed=5)
    randomize_adapters(ours, seed=5)
    check_same_logits_gradients_and_merge_as_peft(theirs, ours, batch(b=2, t=7))


def test_the_support_holds_the_largest_or_smallest_entries():
    for top in (True, False):
        model = ARCHS["llama"]()
        weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        peftlab.attach(model, peftlab.SupertuningConfig(sparsity=0.75, select_top=top, target_modules=["q_proj"]))
        layer = next(layer for name, _, layer in adapter_layers(model) if name == "model.layers.0.self_attn.q_proj")
        chosen = weight.abs().flatten()[layer.supertuning_indices.long()]
        assert chosen.numel() == int(32 * 32 * 0.25) == len(set(layer.supertuning_indices.tolist()))
        rest = torch.ones(weight.numel(), dtype=torch.bool)
        rest[layer.supertuning_indices.long()] = False
        others = weight.abs().flatten()[rest]
        assert (chosen.min() >= others.max()) if top else (chosen.max() <= others.min())


def test_a_file_without_indices_rebuilds_them_from_the_base(tmp_path):
    model = our_model("supra_indices_not_saved", "llama")
    randomize_adapters(model)
    peftlab.save_adapter(model, tmp_path)
    again = ARCHS["llama"]()
    peftlab.load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again, batch()), logits(model, batch()))
    other_base = ARCHS["llama"](seed=1)  # another base picks another support: the file alone does not fix it
    peftlab.load_adapter(other_base, tmp_path)
    first = {name: layer.supertuning_indices for name, _, layer in adapter_layers(again)}
    assert any(not torch.equal(layer.supertuning_indices, first[name]) for name, _, layer in adapter_layers(other_base))


@pytest.mark.parametrize("case", ["supra_alpha_dropout_random", "super"])
def test_merge_unmerge_and_unload_keep_the_output(case):
    model = our_model(case, "llama")
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(peftlab.merge_and_unload(model), x), expected, atol=1e-5, rtol=1e-4)


def test_gpt2_conv1d_is_adapted_here_though_peft_refuses_it():
    model = ARCHS["gpt2"]()
    peftlab.attach(model, peftlab.SupertuningConfig(sparsity=0.9, r=2, target_modules=["c_attn", "mlp.c_proj"]))
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(ARCHS["gpt2"](), peft.SupertuningConfig(target_modules=["c_attn"]))


def test_a_bf16_model_keeps_float32_adapters_and_runs():
    model = ARCHS["llama"]().to(torch.bfloat16)
    peftlab.attach(model, peftlab.SupertuningConfig(sparsity=0.9, r=2, target_modules=["q_proj"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    x = batch()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity="high"), "sparsity must be a finite number"),
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(lora_alpha=16), "lora_alpha=16 is set but r is None"),
    (dict(r=2, lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(select_top="largest"), "select_top must be one of"),
    (dict(init_weights="kaiming"), "init_weights must be one of"),
    (dict(save_precomputed_indices=None), "save_precomputed_indices must be one of"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.SupertuningConfig(target_modules=["q_proj"], **kwargs)


def test_a_sparsity_that_leaves_no_entry_names_the_layer():
    with pytest.raises(peftlab.ConfigError, match=r"v_proj': sparsity=0.999 leaves no trainable entry of its 16 x 32"):
        peftlab.attach(ARCHS["llama"](), peftlab.SupertuningConfig(sparsity=0.999, target_modules=["v_proj"]))


def test_unknown_keys_in_a_file_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'bias'"):
        peftlab.config_from_dict({"peft_type": "SUPERTUNING", "target_modules": ["q_proj"], "bias": "none"})
