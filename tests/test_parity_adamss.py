"""AdaMSS parity with HF PEFT (the oracle): both directions, keys, configs, seeded init, merged weights and biases.

PEFT's AdaMSS clusters with scikit-learn's KMeans (its config refuses to build without scikit-learn); peftlab
reproduces that clustering in numpy, so only the comparisons with PEFT and scikit-learn need it and skip without it.
NeoX's targets have biases (the SVD and the update then cover [W | b]); Llama's have none.
"""
import numpy as np
import pytest
import torch

import peftlab
from models import (
    ARCHS, ParityCases, batch, check_config_round_trip, check_peft_file_loads_in_peftlab,
    check_peftlab_file_loads_in_peft, check_same_file_as_peft, logits, randomize_adapters, tiny_gpt2, tiny_neox,
)
from peftlab.core.inject import adapter_layers
from peftlab.methods.adamss import kmeans_labels

TARGETS = {
    "llama": dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]),
    "neox": dict(target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
}
CASES = {
    "adamss": ("ADAMSS", dict(r=8, num_subspaces=3), ["llama", "neox"]),
    "adamss_rank2": ("ADAMSS", dict(r=12, num_subspaces=4, subspace_rank=2, random_seed=4), ["llama", "neox"]),
    "adamss_dynamic": ("ADAMSS", dict(r=6, subspace_rank=3, use_dynamic_rank=True, svd_threshold=0.3), ["llama"]),
}


def parity():
    pytest.importorskip("sklearn", reason="PEFT's AdaMSS needs scikit-learn")
    import peft

    return ParityCases(CASES, TARGETS, {"ADAMSS": peft.AdamssConfig})


PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peft_checkpoint_loads_in_peftlab(case, arch, tmp_path):
    check_peft_file_loads_in_peftlab(parity().peft_model(case, arch, init_weights=None), ARCHS[arch], tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peftlab_checkpoint_loads_in_peft(case, arch, tmp_path):
    check_peftlab_file_loads_in_peft(ARCHS[arch], parity().ours_config(case, arch), tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    cases, arch = parity(), CASES[case][2][0]
    check_same_file_as_peft(cases.peft_model(case, arch), cases.ours_model(case, arch), tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
@pytest.mark.parametrize("init_weights", ["orthogonal", None])
def test_same_seed_gives_peft_s_initial_adapter(case, arch, init_weights):
    """The same global seed gives PEFT's tensors (A from randomised SVDs of the global stream, B drawn with None)."""
    import peft

    cases = parity()
    torch.manual_seed(7)
    theirs = cases.peft_model(case, arch, init_weights=init_weights)
    torch.manual_seed(7)
    ours = cases.ours_model(case, arch, init_weights=init_weights)
    ours_state = peftlab.core.state.adapter_tensors(ours, "default")
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert {f"base_model.model.{k}" for k in ours_state} == set(theirs_state)
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[f"base_model.model.{key}"]), key
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_merged_weight_and_bias_are_peft_s(case, arch):
    import peft

    cases = parity()
    theirs = cases.peft_model(case, arch)
    randomize_adapters(theirs, seed=5)
    ours = cases.ours_model(case, arch)
    theirs_state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for key, value in peftlab.core.state.adapter_tensors(ours, "default").items():
            value.copy_(theirs_state[f"base_model.model.{key}"])
    modules = dict(theirs.base_model.model.named_modules())
    for module_name, _, layer in adapter_layers(ours):
        torch.testing.assert_close(layer.delta_weight(), modules[module_name].get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-5)
        bias = ours.get_submodule(module_name).base_layer.bias
        if bias is not None:
            torch.testing.assert_close(layer.merge_bias(bias) - bias, modules[module_name].get_delta_bias("default"),
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_kmeans_labels_are_scikit_learn_s(seed):
    cluster = pytest.importorskip("sklearn.cluster", reason="the reference is scikit-learn's KMeans")
    g = torch.Generator().manual_seed(seed)
    n, d, k = int(torch.randint(8, 400, (1,), generator=g)), int(torch.randint(2, 24, (1,), generator=g)), 2 + seed % 7
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g)
    expected = cluster.KMeans(n_clusters=k, init="random", n_init=1, max_iter=10,
                              random_state=123456789).fit_predict(x.numpy())
    assert np.array_equal(kmeans_labels(x, k), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    pytest.importorskip("sklearn", reason="PEFT's AdamssConfig needs scikit-learn")
    check_config_round_trip(parity().ours_config(case, CASES[case][2][0]))


def with_biases(make):
    """``make``'s model with random biases (the tiny models start with zero ones, which the SVD would leave out)."""
    def build():
        model = make()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return model
    return build


@pytest.mark.parametrize("make,targets", [(tiny_neox, ["query_key_value", "dense"]), (tiny_gpt2, ["c_attn", "mlp.c_proj"])])
def test_bias_is_updated_and_merged_and_conv1d_works(make, targets, tmp_path):
    """With biases, merging writes the bias column of the update into the bias; GPT-2's Conv1D (which PEFT does not
    adapt) works through the (out, in) view; saves load back bit for bit."""
    make = with_biases(make)
    model = make()
    peftlab.attach(model, peftlab.AdamssConfig(r=8, num_subspaces=3, target_modules=targets))
    randomize_adapters(model)
    x = batch()
    ref = logits(model, x)
    peftlab.save_adapter(model, tmp_path)
    fresh = make()
    peftlab.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), ref)
    biases = {name: model.get_submodule(name).base_layer.bias.detach().clone() for name, _, _ in adapter_layers(model)}
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-4)
    for name, bias in biases.items():
        assert (model.get_submodule(name).base_layer.bias - bias).abs().max() > 1e-4, name
    peftlab.unmerge(model)
    for name, bias in biases.items():
        torch.testing.assert_close(model.get_submodule(name).base_layer.bias, bias, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(num_subspaces=1.5), "num_subspaces must be a positive integer"),
    (dict(subspace_rank=-1), "subspace_rank must be a positive integer"),
    (dict(init_weights="gaussian"), "init_weights must be one of"),
    (dict(use_asa=True), "use_asa=True .* is not implemented"),
    (dict(svd_threshold="x"), "svd_threshold"),
    (dict(random_seed=None), "random_seed must be an integer"),
    (dict(exclude_modules=["k_proj"]), "exclude_modules is not an option of PEFT's AdaMSS"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.AdamssConfig(target_modules=["q_proj"], **kwargs)


def test_false_init_weights_reads_as_none_as_in_peft():
    assert peftlab.AdamssConfig(target_modules=["q_proj"], init_weights=False).init_weights is None


def test_nonzero_biases_match_peft_both_ways_and_in_the_merged_bias(tmp_path):
    """The tiny models' biases start at zero; with random ones the bias column of [W | b] shapes the SVD, the
    clustering and the update, and both libraries still agree."""
    import peft

    parity()
    make = with_biases(tiny_neox)
    kwargs = dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=["query_key_value", "dense"])
    theirs = peft.get_peft_model(make(), peft.AdamssConfig(**kwargs, init_weights=None)).eval()
    ours = check_peft_file_loads_in_peftlab(theirs, make, tmp_path / "peft")
    modules = dict(theirs.base_model.model.named_modules())
    for module_name, _, layer in adapter_layers(ours):
        bias = ours.get_submodule(module_name).base_layer.bias
        torch.testing.assert_close(layer.merge_bias(bias) - bias, modules[module_name].get_delta_bias("default"),
                                   atol=1e-6, rtol=1e-5)
    check_peftlab_file_loads_in_peft(make, peftlab.AdamssConfig(**kwargs), tmp_path / "ours")
