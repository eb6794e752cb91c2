"""PSOFT / OSF / AdaMSS parity with HF PEFT (the oracle): both directions, keys, configs, seeded init, merged weights,
OSF's projected gradients, bad input.

All three build frozen factors from an SVD of the base weight; PSOFT and OSF save only the trainable tensors, so every
load rebuilds the factors from the base (AdaMSS saves its V_R but clusters the base again). PEFT adapts nn.Linear only
with all three: Llama and NeoX here. The Llama targets mix in < out (up_proj), in > out (k_proj, down_proj) and
square (q_proj) layers: OSF's gradient projection takes another branch for each orientation. NeoX's targets have
biases, which AdaMSS's SVD and update cover ([W | b]).

PEFT's AdaMSS clusters with scikit-learn's KMeans (its config refuses to build without scikit-learn); peftlab
reproduces that clustering in numpy, so only the comparisons with PEFT's AdaMSS and scikit-learn need it and skip
without it.
"""
import numpy as np
import peft
import pytest
import torch

import peftlab
from models import (
    ARCHS, ParityCases, batch, check_config_round_trip, check_peft_file_loads_in_peftlab,
    check_peftlab_file_loads_in_peft, check_same_file_as_peft, check_same_init_as_peft, logits, randomize_adapters,
    tiny_gpt2, tiny_llama, tiny_neox,
)
from peftlab.core.inject import adapter_layers
from peftlab.methods.adamss import kmeans_labels

TARGETS = {
    "llama": ["q_proj", "k_proj", "up_proj", "down_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
}
BOTH, LLAMA = ["llama", "neox"], ["llama"]

# (peft_type, settings, architectures, targets): settings and targets go to both libraries' config classes.
CASES = {
    "psoft": ("PSOFT", dict(r=4), BOTH, TARGETS),
    "psoft_pissa_lowrank": ("PSOFT", dict(r=6, ab_svd_init="pissa_init", psoft_svd="lowrank", psoft_svd_lowrank_niter=3,
                                          random_seed=5, psoft_alpha=8), LLAMA, TARGETS),
    "psoft_free_no_mag_a": ("PSOFT", dict(r=4, psoft_orth=False, psoft_mag_a=False, psoft_alpha=16), BOTH, TARGETS),
    "psoft_neumann": ("PSOFT", dict(r=5, use_cayley_neumann=True, num_cayley_neumann_terms=6, cayley_neumann_eps=0.3,
                                    psoft_mag_b=False, psoft_dropout=0.1), LLAMA, TARGETS),
    "osf": ("OSF", dict(), BOTH, TARGETS),
    "osf_rank": ("OSF", dict(effective_rank=5), LLAMA, TARGETS),
    "osf_fraction_patterns": ("OSF", dict(effective_rank=0.25, rank_pattern={"up_proj": 3, r"layers\.1\..*q": 0.75,
                                                                            "dense_4h": 30}), BOTH, TARGETS),
    "adamss": ("ADAMSS", dict(r=8, num_subspaces=3), BOTH, TARGETS),
    "adamss_rank2": ("ADAMSS", dict(r=12, num_subspaces=4, subspace_rank=2, random_seed=4), BOTH, TARGETS),
    "adamss_dynamic": ("ADAMSS", dict(r=6, subspace_rank=3, use_dynamic_rank=True, svd_threshold=0.3), LLAMA, TARGETS),
}
PARITY = ParityCases(CASES, ARCHS, {"PSOFT": peft.PsoftConfig, "OSF": peft.OSFConfig, "ADAMSS": peft.AdamssConfig})
PAIRS = PARITY.pairs
INIT_WEIGHTS = {"PSOFT": (True, False), "OSF": (True, False), "ADAMSS": ("orthogonal", None)}  # identity first


def needs_peft(case):
    """Skip where PEFT cannot build the case (its AdaMSS needs scikit-learn)."""
    if CASES[case][0] == "ADAMSS":
        pytest.importorskip("sklearn", reason="PEFT's AdaMSS needs scikit-learn")


def peft_model(case, arch, **extra):
    needs_peft(case)
    return PARITY.peft_model(case, arch, **extra)


ours_config = PARITY.ours


def ours_model(case, arch, **extra):
    model = ARCHS[arch]()
    peftlab.attach(model, ours_config(case, arch, **extra))
    return model


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peft_checkpoint_loads_in_peftlab(case, arch, tmp_path):
    check_peft_file_loads_in_peftlab(peft_model(case, arch), ARCHS[arch], tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peftlab_checkpoint_loads_in_peft(case, arch, tmp_path):
    needs_peft(case)
    check_peftlab_file_loads_in_peft(ARCHS[arch], ours_config(case, arch), tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = PARITY.first_arch(case)
    check_same_file_as_peft(peft_model(case, arch), ours_model(case, arch), tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
@pytest.mark.parametrize("identity", [True, False])
def test_same_seed_gives_peft_s_initial_adapter(case, arch, identity):
    """The same global seed before attaching gives PEFT's tensors (AdaMSS: A from randomised SVDs of the global
    stream) and its outputs; with the non-identity init the adapter already changes the model."""
    init_weights = INIT_WEIGHTS[CASES[case][0]][0 if identity else 1]
    torch.manual_seed(7)
    theirs = peft_model(case, arch, init_weights=init_weights)
    torch.manual_seed(7)
    ours = ours_model(case, arch, init_weights=init_weights)
    check_same_init_as_peft(theirs, ours)
    x = batch()
    out = logits(ours, x)
    torch.testing.assert_close(out, logits(theirs, x), atol=1e-5, rtol=1e-4)
    assert torch.allclose(out, logits(ARCHS[arch](), x), atol=1e-5) == identity


@pytest.mark.parametrize("case,arch", PAIRS)
def test_merged_weight_is_peft_s(case, arch):
    """delta_weight (what merging adds) equals PEFT's get_delta_weight on every layer, and AdaMSS's bias update its
    get_delta_bias."""
    theirs = peft_model(case, arch)
    randomize_adapters(theirs, seed=5)
    ours = ours_model(case, arch)
    theirs_state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for key, value in peftlab.core.state.adapter_tensors(ours, "default").items():
            value.copy_(theirs_state[f"base_model.model.{key}"])
    modules = dict(theirs.base_model.model.named_modules())
    for module_name, _, layer in adapter_layers(ours):
        torch.testing.assert_close(layer.delta_weight(), modules[module_name].get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-5)
        bias = ours.get_submodule(module_name).base_layer.bias
        if bias is not None and hasattr(modules[module_name], "get_delta_bias"):
            torch.testing.assert_close(layer.merge_bias(bias) - bias, modules[module_name].get_delta_bias("default"),
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case,arch", [p for p in PAIRS if p[0].startswith("osf")])
def test_osf_gradients_are_peft_s_projected_ones(case, arch):
    """One backward pass from the same random start gives PEFT's gradients, which its hooks project away from the
    frozen top directions (U_hi^T dU = 0, dV V_hi^T = 0) in every orientation."""
    torch.manual_seed(3)
    theirs = peft_model(case, arch, init_weights=False)
    torch.manual_seed(3)
    ours = ours_model(case, arch, init_weights=False)
    x = batch()
    theirs(x, labels=x).loss.backward()
    ours(x, labels=x).loss.backward()
    modules = dict(theirs.base_model.model.named_modules())
    for module_name, _, layer in adapter_layers(ours):
        theirs_params = modules[module_name].osf_svd_params["default"]
        for name, p in layer.osf_svd_params.items():
            torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=1e-6, rtol=1e-4)
        u, s, vh = torch.linalg.svd(modules[module_name].get_base_layer().weight, full_matrices=False)
        k = layer.effective_rank
        assert (u[:, :k].t() @ layer.osf_svd_params["U_low"].grad).abs().max() < 1e-6
        assert (layer.osf_svd_params["V_low"].grad @ vh[:k].t()).abs().max() < 1e-6


def test_osf_training_keeps_the_top_directions_and_unmerges():
    """SGD steps (not Adam's, whose per-entry scaling leaves the projected subspace) leave W's projection onto the
    frozen top-k left directions as it was (PEFT's promise), and unmerging (which PEFT lacks) restores the base."""
    model = ours_model("osf_rank", "llama")
    layer = model.model.layers[0].self_attn.k_proj.adapters["default"]
    w0 = model.model.layers[0].self_attn.k_proj.base_layer.weight.detach().clone()
    u_hi = torch.linalg.svd(w0, full_matrices=False)[0][:, :5]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=30.0)
    x = batch()
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    delta = layer.delta_weight()
    assert delta.abs().max() > 1e-3
    assert (u_hi.t() @ delta).norm() < 1e-4 * delta.norm()
    ref = logits(model, x)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-4)
    peftlab.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_psoft_rotation_is_orthogonal_and_the_update_stays_in_the_principal_subspace():
    model = ours_model("psoft", "llama", psoft_mag_a=False, psoft_mag_b=False)
    randomize_adapters(model, std=0.5)
    for module_name, _, layer in adapter_layers(model):
        rot = layer.rotation()
        torch.testing.assert_close(rot @ rot.t(), torch.eye(layer.r), atol=1e-5, rtol=0)
        w0 = model.get_submodule(module_name).base_layer.weight
        u, _, vh = torch.linalg.svd(w0, full_matrices=False)
        delta = layer.delta_weight()
        torch.testing.assert_close(u[:, :4] @ (u[:, :4].t() @ delta @ vh[:4].t()) @ vh[:4], delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["psoft", "osf"])
def test_gpt2_conv1d_works_here(case, tmp_path):
    """PEFT adapts nn.Linear only (its OSF skips GPT-2's Conv1D silently); the view's (out, in) weight makes Conv1D
    work here: merging gives the same output and a save loads back bit for bit."""
    model = tiny_gpt2()
    peftlab.attach(model, peftlab.lookup(CASES[case][0]).config(target_modules=["c_attn", "mlp.c_proj"],
                                                                **CASES[case][1]))
    randomize_adapters(model)
    x = batch()
    ref = logits(model, x)
    assert not torch.allclose(ref, logits(tiny_gpt2(), x), atol=1e-4)
    peftlab.save_adapter(model, tmp_path)
    fresh = tiny_gpt2()
    peftlab.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), ref)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    needs_peft(case)
    check_config_round_trip(ours_config(case, PARITY.first_arch(case)))


@pytest.mark.parametrize("peft_type,kwargs,match", [
    ("PSOFT", dict(r=0), "r must be a positive integer"),
    ("PSOFT", dict(r=2.5), "r must be a positive integer"),
    ("PSOFT", dict(ab_svd_init="olora"), "ab_svd_init must be one of"),
    ("PSOFT", dict(psoft_svd="randomized"), "psoft_svd must be one of"),
    ("PSOFT", dict(psoft_svd_lowrank_niter=0), "psoft_svd_lowrank_niter"),
    ("PSOFT", dict(psoft_dropout=1.0), "psoft_dropout"),
    ("PSOFT", dict(psoft_alpha="big"), "psoft_alpha"),
    ("PSOFT", dict(random_seed=1.5), "random_seed"),
    ("PSOFT", dict(psoft_orth="yes"), "psoft_orth"),
    ("PSOFT", dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms"),
    ("PSOFT", dict(cayley_neumann_eps=1.0), "cayley_neumann_eps"),
    ("OSF", dict(effective_rank=0), "effective_rank must be"),
    ("OSF", dict(effective_rank="half"), "effective_rank must be"),
    ("OSF", dict(rank_pattern={"q_proj": -1}), r"rank_pattern\['q_proj'\]"),
    ("OSF", dict(rank_pattern=[("q_proj", 2)]), "rank_pattern must be a dict"),
    ("OSF", dict(init_weights="random"), "init_weights"),
    ("OSF", dict(layers_to_transform=[0]), "layers_to_transform is not an option of PEFT's OSF"),
    ("OSF", dict(exclude_modules=["q_proj"]), "exclude_modules is not an option of PEFT's OSF"),
    ("ADAMSS", dict(r=0), "r must be a positive integer"),
    ("ADAMSS", dict(num_subspaces=1.5), "num_subspaces must be a positive integer"),
    ("ADAMSS", dict(subspace_rank=-1), "subspace_rank must be a positive integer"),
    ("ADAMSS", dict(init_weights="gaussian"), "init_weights must be one of"),
    ("ADAMSS", dict(use_asa=True), "use_asa=True .* is not implemented"),
    ("ADAMSS", dict(svd_threshold="x"), "svd_threshold"),
    ("ADAMSS", dict(random_seed=None), "random_seed must be an integer"),
    ("ADAMSS", dict(exclude_modules=["k_proj"]), "exclude_modules is not an option of PEFT's AdaMSS"),
])
def test_bad_settings_name_the_field(peft_type, kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("peft_type,kwargs,match", [
    ("PSOFT", dict(r=17), r"PSOFT on 'model.layers.0.self_attn.k_proj': r=17 exceeds min\(in_features, out_features\)"),
    ("OSF", dict(effective_rank=0.01), "OSF on 'model.layers.0.self_attn.k_proj': effective_rank comes out as 0"),
])
def test_ranks_that_do_not_fit_a_layer_name_it(peft_type, kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(tiny_llama(), peftlab.lookup(peft_type).config(target_modules=["k_proj"], **kwargs))


def test_unknown_keys_in_files_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "PSOFT", "target_modules": ["q_proj"], "lora_alpha": 8})
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'r'"):
        peftlab.config_from_dict({"peft_type": "OSF", "target_modules": ["q_proj"], "r": 8})


@pytest.mark.parametrize("seed", range(40))
def test_kmeans_labels_are_scikit_learn_s(seed):
    cluster = pytest.importorskip("sklearn.cluster", reason="the reference is scikit-learn's KMeans")
    g = torch.Generator().manual_seed(seed)
    n, d, k = int(torch.randint(8, 400, (1,), generator=g)), int(torch.randint(2, 24, (1,), generator=g)), 2 + seed % 7
    x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g)
    expected = cluster.KMeans(n_clusters=k, init="random", n_init=1, max_iter=10,
                              random_state=123456789).fit_predict(x.numpy())
    assert np.array_equal(kmeans_labels(x, k), expected)


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


@pytest.mark.parametrize("make,targets", [(tiny_neox, ["query_key_value", "dense"]),
                                          (tiny_gpt2, ["c_attn", "mlp.c_proj"])])
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


def test_false_init_weights_reads_as_none_as_in_peft():
    assert peftlab.AdamssConfig(target_modules=["q_proj"], init_weights=False).init_weights is None


def test_nonzero_biases_match_peft_both_ways_and_in_the_merged_bias(tmp_path):
    """The tiny models' biases start at zero; with random ones the bias column of [W | b] shapes the SVD, the
    clustering and the update, and both libraries still agree."""
    import peft

    pytest.importorskip("sklearn", reason="PEFT's AdaMSS needs scikit-learn")
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


def test_adamss_packed_views_load_by_copy_also_when_sharing(tmp_path):
    """AdaMSS keeps PEFT's per-group A_i and B_i packed in two parameters and hands out views of them as its file's
    tensors: a load (also serving's, which shares the file's storage for whole tensors) must write into the packed
    parameters, not rebind a view."""
    from peftlab.core.state import attach_loaded, read_adapter_weights, read_config

    ours = ours_model("adamss", "llama")
    randomize_adapters(ours, seed=3)
    peftlab.save_adapter(ours, tmp_path / "a")
    for share in (False, True):
        fresh = ARCHS["llama"]()
        tensors = {k.removeprefix("base_model.model."): v for k, v in read_adapter_weights(tmp_path / "a").items()}
        attach_loaded(fresh, read_config(tmp_path / "a"), "default", tensors, "test", share=share)
        x = batch()
        torch.testing.assert_close(logits(fresh, x), logits(ours, x), atol=0, rtol=0)


def test_fully_loaded_counts_a_packed_parameter_only_when_its_views_cover_it():
    """attach_loaded skips an adapter's own initialisation only when the file overwrites every parameter; a packed
    parameter is overwritten through views of it (AdaMSS, TinyLoRA) only when they cover all its elements."""
    from peftlab.core.state import fully_loaded

    packed, whole = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(3))
    assert fully_loaded([whole, packed[:4], packed[4:].view(3, 2)]) == {id(whole), id(packed)}
    assert fully_loaded([packed[:4], packed[5:]]) == set()
    grid = torch.nn.Parameter(torch.zeros(4, 3))
    assert fully_loaded([grid[:, :2], grid[:, 2]]) == {id(grid)}
