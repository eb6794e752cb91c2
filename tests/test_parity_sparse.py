"""WaveFT / Super-Tuning / FRoD parity with HF PEFT (the oracle): both directions, keys, configs, initial weights
drawn from the same seed (locations, supports, bases, patterns), gradients, merged weights, bad input; and each
method's building blocks against PEFT's own (wavelet filters and inverse DWT, FRoD's categories, bases, patterns).

PEFT adapts GPT-2's Conv1D with WaveFT and FRoD, not with Super-Tuning (nn.Linear only): that one uses Llama and NeoX.
"""
import peft
import pytest
import torch
from peft.tuners.frod import model as peft_frod
from peft.tuners.waveft.wavelet import Wavelet as PeftWavelet
from peft.tuners.waveft.waverec2d import waverec2d

import peftlab
from peftlab.core.inject import adapter_layers
from peftlab.methods._seeded import projection_generator
from peftlab.methods.frod import category_of, layer_index_of, off_diagonal_pattern, shared_basis, split_weight
from peftlab.ops.wavelet import daubechies_filter, inverse_dwt2
from models import (
    ARCHS, batch, both_ways_tests, check_merge_unmerge, check_same_logits_gradients_and_merge_as_peft,
    check_same_seeded_save_as_peft, logits, randomize_adapters,
)

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_proj"],
}
# (peft_type, settings passed to both libraries' configs (over the architecture's targets), architectures)
CASES = {
    "waveft": ("WAVEFT", dict(n_frequency=64, scaling=5.0), ["llama", "gpt2"]),
    "waveft_default_scaling": ("WAVEFT", dict(n_frequency=100), ["llama"]),
    "waveft_db3_normal_init": ("WAVEFT", dict(n_frequency=50, scaling=3.0, wavelet_family="db3", init_weights=False),
                               ["llama", "gpt2"]),
    "waveft_db10_pattern_seed": ("WAVEFT", dict(n_frequency=40, scaling=2.0, wavelet_family="db10", random_loc_seed=3,
                                                n_frequency_pattern={"q_proj": 30, "layers.1.mlp.down_proj": 7}),
                                 ["llama"]),
    "waveft_no_idwt": ("WAVEFT", dict(n_frequency=80, scaling=2.0, use_idwt=False, wavelet_family="db4"), ["llama"]),
    "waveft_proportional": ("WAVEFT", dict(n_frequency=60, scaling=2.0, wavelet_family="db2",
                                           proportional_parameters=True), ["llama", "gpt2"]),
    "waveft_bias_only": ("WAVEFT", dict(n_frequency=64, scaling=5.0, bias="waveft_only"), ["gpt2"]),
    "super": ("SUPERTUNING", dict(sparsity=0.9), ["llama", "neox"]),
    "super_default_bottom": ("SUPERTUNING", dict(select_top=False), ["llama"]),
    "super_random_init": ("SUPERTUNING", dict(sparsity=0.8, init_weights=False), ["llama"]),
    "supra": ("SUPERTUNING", dict(sparsity=0.95, r=4), ["llama", "neox"]),
    "supra_alpha_dropout_random": ("SUPERTUNING", dict(sparsity=0.9, r=2, lora_alpha=5, lora_dropout=0.1,
                                                       init_weights=False), ["llama"]),
    "supra_indices_not_saved": ("SUPERTUNING", dict(sparsity=0.9, r=3, select_top=False,
                                                    save_precomputed_indices=False), ["llama", "neox"]),
    "frod": ("FROD", dict(), ["llama", "neox", "gpt2"]),
    "frod_dense_random_key": ("FROD", dict(sparse_rate=0.1, projection_prng_key=7, init_weights=False),
                              ["llama", "gpt2"]),
    "frod_no_projection_in_file": ("FROD", dict(sparse_rate=0.05, save_projection=False, init_weights=False,
                                                regularization_alpha=0.05), ["llama", "neox"]),
    # one layer: v_proj / k_proj stack fewer rows (16) than columns (32), so their basis comes from the SVD
    "frod_one_layer_svd": ("FROD", dict(layers_to_transform=[0], init_weights=False, frod_dropout=0.1,
                                        target_modules=["k_proj", "v_proj", "o_proj"]), ["llama"]),
    "frod_no_sparse_part": ("FROD", dict(sparse_rate=0.0, init_weights=False), ["llama"]),
    "frod_bias_only": ("FROD", dict(init_weights=False, bias="frod_only"), ["gpt2"]),
}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"WAVEFT": peft.WaveFTConfig, "SUPERTUNING": peft.SupertuningConfig, "FROD": peft.FrodConfig}
# FRoD's λ are of the size of the weights' singular values: a smaller random change keeps the tiny models in range
RANDOM_STD = {"WAVEFT": 0.1, "SUPERTUNING": 0.1, "FROD": 0.02}


def settings(case, arch):
    peft_type, kwargs, _ = CASES[case]
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    if peft_type == "FROD":
        extra["progressbar"] = False
    return peft_type, {"target_modules": TARGETS[arch], **extra, **kwargs}


def peft_model(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](**kwargs)).eval()


def our_config(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peftlab.lookup(peft_type).config(**kwargs)


def our_model(case, arch):
    model = ARCHS[arch]().eval()
    peftlab.attach(model, our_config(case, arch))
    return model


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, our_config, ARCHS)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_keys_shapes_config_and_initial_weights_as_peft(case, arch, tmp_path):
    """Built from the same global seed, both libraries save the same tensors (the same draws in the same order, the
    same supports and bases) under the same keys and dtypes, with the same config fields and values."""
    _, theirs = check_same_seeded_save_as_peft(lambda: peft_model(case, arch), lambda: our_model(case, arch), tmp_path)
    peft_type, kwargs, _ = CASES[case]
    if peft_type == "WAVEFT":
        assert all(key.endswith((".waveft_spectrum", ".bias")) for key in theirs)
    elif peft_type == "SUPERTUNING":
        saves_indices = kwargs.get("save_precomputed_indices", True)
        assert any(key.endswith("supertuning_indices") for key in theirs) == saves_indices
    else:
        assert any(key.startswith("base_model.frod_") for key in theirs) == kwargs.get("save_projection", True)


@pytest.mark.parametrize("case,arch", [
    ("waveft", "gpt2"), ("waveft_db3_normal_init", "llama"), ("waveft_db10_pattern_seed", "llama"),
    ("waveft_no_idwt", "llama"), ("super_random_init", "llama"), ("supra", "neox"),
    ("supra_indices_not_saved", "llama"), ("frod", "gpt2"), ("frod_dense_random_key", "llama"),
    ("frod_no_projection_in_file", "neox"), ("frod_one_layer_svd", "llama"),
])
def test_same_logits_gradients_and_merged_weights_as_peft(case, arch):
    torch.manual_seed(1)
    theirs = peft_model(case, arch)
    torch.manual_seed(1)
    ours = our_model(case, arch)
    std = RANDOM_STD[CASES[case][0]]
    randomize_adapters(theirs, seed=5, std=std)
    randomize_adapters(ours, seed=5, std=std)
    check_same_logits_gradients_and_merge_as_peft(theirs, ours, batch(b=2, t=7))


@pytest.mark.parametrize("case,arch", [("waveft", "gpt2"), ("waveft_db3_normal_init", "llama"),
                                       ("supra_alpha_dropout_random", "llama"), ("super", "llama"),
                                       ("frod_dense_random_key", "llama"), ("frod_one_layer_svd", "llama")])
def test_merge_unmerge_and_unload_keep_the_output(case, arch):
    model = our_model(case, arch)
    randomize_adapters(model, std=RANDOM_STD[CASES[case][0]])
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(peftlab.merge_and_unload(model), x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [
    peftlab.FourierFTConfig(n_frequency=50, target_modules=["q_proj"]),
    peftlab.C3AConfig(block_size=8, target_modules=["q_proj"]),
    peftlab.WaveFTConfig(n_frequency=50, wavelet_family="db2", target_modules=["q_proj"]),
    peftlab.SupertuningConfig(sparsity=0.9, r=2, target_modules=["q_proj"]),
    peftlab.FrodConfig(target_modules=["q_proj"], init_weights=False),
])
def test_a_bf16_model_keeps_float32_adapters_and_runs(config):
    model = ARCHS["llama"]().to(torch.bfloat16)
    peftlab.attach(model, config)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    x = batch()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)


# -- WaveFT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,arch", [("waveft_db10_pattern_seed", "llama"), ("waveft_proportional", "llama"),
                                       ("waveft_proportional", "gpt2")])
def test_locations_and_per_module_counts_are_peft_s(case, arch):
    theirs, ours = peft_model(case, arch), our_model(case, arch)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.waveft.WaveFTLayer)}
    layers = {module: layer for module, _, layer in adapter_layers(ours)}
    assert layers.keys() == peft_layers.keys()
    counts = {name: layer.waveft_spectrum.numel() for name, layer in layers.items()}
    assert counts == {name: layer.waveft_n_frequency["default"] for name, layer in peft_layers.items()}
    for name, layer in layers.items():
        assert torch.equal(layer.indices, peft_layers[name].waveft_indices["default"]), name
    if case == "waveft_db10_pattern_seed":
        assert counts["model.layers.0.self_attn.q_proj"] == 30 and counts["model.layers.1.mlp.down_proj"] == 7
    else:
        assert len(set(counts.values())) > 1


@pytest.mark.parametrize("order", range(1, 11))
def test_daubechies_filters_and_inverse_dwt_match_peft(order):
    taps = daubechies_filter(order)
    reference = PeftWavelet(f"db{order}").rec_lo
    assert len(taps) == len(reference) == 2 * order
    assert max(abs(a - b) for a, b in zip(taps, reference)) < 1e-11  # PEFT's db3 table is rounded at ~4e-12
    g = torch.Generator().manual_seed(order)
    for rows, cols in [(12, 20), (34, 8)]:
        rows, cols = rows + 2 * order, cols + 2 * order
        dense = torch.randn(rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
        h, w = rows // 2, cols // 2
        theirs = waverec2d((dense[:h, :w], (dense[:h, w:], dense[h:, :w], dense[h:, w:])), f"db{order}")
        ours = inverse_dwt2(dense, taps)
        assert ours.shape == theirs.shape == (rows - 2 * order + 2, cols - 2 * order + 2)
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)
    # once per order: both cases above cut the same (8 + 2 order) x (6 + 2 order) corner, and the map is linear, so
    # its Jacobian there does not depend on the values
    assert torch.autograd.gradcheck(lambda d: inverse_dwt2(d, taps), (dense[:8 + 2 * order, :6 + 2 * order],))


def test_haar_synthesis_is_orthogonal():
    """db1's inverse DWT is an orthogonal map: it keeps the Frobenius norm of the coefficients."""
    dense = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(inverse_dwt2(dense, daubechies_filter(1)).norm(), dense.norm())


def test_a_file_naming_a_family_peftlab_lacks_is_refused(tmp_path):
    peft.get_peft_model(ARCHS["llama"](), peft.WaveFTConfig(n_frequency=20, wavelet_family="sym2",
                                                            target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(peftlab.ConfigError, match="wavelet_family='sym2' is not implemented"):
        peftlab.load_adapter(ARCHS["llama"](), tmp_path)


def test_too_many_coefficients_for_a_layer_names_it():
    with pytest.raises(peftlab.ConfigError, match=r"v_proj': n_frequency=513 exceeds the 16 x 32 = 512"):
        peftlab.attach(ARCHS["llama"](), peftlab.WaveFTConfig(n_frequency=513, target_modules=["v_proj"]))


# -- Super-Tuning --------------------------------------------------------------------------------
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


def test_gpt2_conv1d_is_adapted_here_though_peft_refuses_it():
    model = ARCHS["gpt2"]()
    peftlab.attach(model, peftlab.SupertuningConfig(sparsity=0.9, r=2, target_modules=["c_attn", "mlp.c_proj"]))
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(ARCHS["gpt2"](), peft.SupertuningConfig(target_modules=["c_attn"]))


def test_a_sparsity_that_leaves_no_entry_names_the_layer():
    with pytest.raises(peftlab.ConfigError, match=r"v_proj': sparsity=0.999 leaves no trainable entry of its 16 x 32"):
        peftlab.attach(ARCHS["llama"](), peftlab.SupertuningConfig(sparsity=0.999, target_modules=["v_proj"]))


def test_unknown_keys_in_a_file_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'bias'"):
        peftlab.config_from_dict({"peft_type": "SUPERTUNING", "target_modules": ["q_proj"], "bias": "none"})


# -- FRoD ---------------------------------------------------------------------------------------
def test_layers_hold_peft_s_frozen_factors_and_the_base_exactly_at_init():
    theirs, ours = peft_model("frod_dense_random_key", "llama"), our_model("frod", "llama")
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.frod.FrodLayer)}
    layers = {name: layer for name, _, layer in adapter_layers(ours)}
    assert layers.keys() == peft_layers.keys()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.frod_U, peft_layers[name].frod_U["default"], atol=0, rtol=0)
        assert torch.equal(layer.delta_weight(), torch.zeros(layer.out_features, layer.in_features))
    x = batch()
    assert torch.equal(logits(ours, x), logits(ARCHS["llama"](), x))


def test_a_file_without_projections_rebuilds_them_from_the_base(tmp_path):
    model = our_model("frod_no_projection_in_file", "llama")
    randomize_adapters(model, std=0.02)
    peftlab.save_adapter(model, tmp_path)
    again = ARCHS["llama"]()
    peftlab.load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again, batch()), logits(model, batch()), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key", ["model.layers.3.self_attn.q_proj", "encoder.layer.0.attention.output.dense",
                                 "encoder.layer.0.output.dense", "transformer.h.1.c_attn", "lm_head",
                                 "gpt_neox.layers.1.attention.dense", "classifier.dense", "layers.x.mlp.fc"])
def test_categories_and_layer_indices_are_peft_s(key):
    assert category_of(key) == peft_frod._category_from_key(key)
    assert layer_index_of(key, 9) == peft_frod._layer_index_from_key(key, 9)


@pytest.mark.parametrize("rows,cols,count", [(6, 4, 3), (3, 8, 2), (2, 8, 1), (5, 5, 2)])
def test_shared_bases_are_peft_s(rows, cols, count):
    g = torch.Generator().manual_seed(rows * 10 + cols)
    weights = [torch.randn(rows, cols, generator=g) for _ in range(count)]
    torch.testing.assert_close(shared_basis(weights, 1e-3), peft_frod._projection_from_weights(weights, 1e-3),
                               atol=0, rtol=0)


def test_shared_basis_is_computed_where_its_weights_are():
    """attach builds the basis from CPU copies while the default device is the model's (a CUDA model failed with
    "Expected all tensors to be on the same device" on the H100); "meta" stands in for CUDA here."""
    weights = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.device("meta"):
        basis = shared_basis(weights, 1e-3)
    assert torch.equal(basis, shared_basis(weights, 1e-3))


def test_a_split_without_device_memory_is_solved_on_the_cpu(monkeypatch):
    """Each layer's W V^-T is solved where the weight is; a device out of memory (float64 V and its LU at 8B widths)
    retries on the CPU instead of failing attach, with the same result; a singular V still takes the pseudo-inverse."""
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    basis = shared_basis([weight, torch.randn(6, 4, generator=torch.Generator().manual_seed(1))], 1e-3)
    expected = split_weight(weight, basis)
    real, calls = torch.linalg.solve, []

    def solve_once_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.linalg, "solve", solve_once_out_of_memory)
    u, norms = split_weight(weight, basis)
    assert len(calls) == 2 and torch.equal(u, expected[0]) and torch.equal(norms, expected[1])
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0
    u, norms = split_weight(weight, singular)  # solve refuses it (a RuntimeError that is not out of memory)
    torch.testing.assert_close(norms[0], weight[:, 0].norm())
    assert torch.equal(norms[1:], torch.zeros(3)) and torch.equal(u[:, 1:], torch.zeros(6, 3))


@pytest.mark.parametrize("size,rate", [(8, 0.1), (8, 0.0), (5, 1.0), (1, 0.5), (32, 0.001), (16, 0.01)])
def test_patterns_are_peft_s_and_off_the_diagonal(size, rate):
    ours = off_diagonal_pattern(size, rate, projection_generator(4))
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off = positions[positions[:, 0] != positions[:, 1]]
    nnz = min(int(size * size * rate), off.shape[0])
    nnz = max(1, nnz) if rate > 0 and off.shape[0] > 0 else nnz
    expected = off[torch.randperm(off.shape[0], generator=projection_generator(4))[:nnz]].t() if nnz else off.t()[:, :0]
    assert torch.equal(ours, expected)
    assert (ours[0] != ours[1]).all()


def test_embedding_targets_are_refused():
    with pytest.raises(peftlab.AdapterError, match="FrodLayer cannot adapt 'model.embed_tokens'"):
        peftlab.attach(ARCHS["llama"](), peftlab.FrodConfig(target_modules=["q_proj", "embed_tokens"]))


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    ("WAVEFT", dict(n_frequency=0), "n_frequency must be a positive integer"),
    ("WAVEFT", dict(n_frequency_pattern={"q_proj": 2.5}), r"n_frequency_pattern\['q_proj'\]"),
    ("WAVEFT", dict(random_loc_seed=None), "random_loc_seed must be an integer"),
    ("WAVEFT", dict(scaling="high"), "scaling must be a finite number"),
    ("WAVEFT", dict(init_weights="gaussian"), "init_weights must be one of"),
    ("WAVEFT", dict(use_idwt=1), "use_idwt must be one of"),
    ("WAVEFT", dict(proportional_parameters="yes"), "proportional_parameters must be one of"),
    ("WAVEFT", dict(bias="lora_only"), "bias must be one of .*'waveft_only'"),
    ("WAVEFT", dict(wavelet_family="sym4"),
     "wavelet_family='sym4' is not implemented in peftlab; supported: db1 ... db10"),
    ("WAVEFT", dict(wavelet_family="coif2"), "wavelet_family='coif2' is not implemented"),
    ("WAVEFT", dict(wavelet_family="db11"), "wavelet_family='db11' is not implemented"),
    ("WAVEFT", dict(wavelet_family="haar"), "wavelet_family must name a wavelet"),
    ("WAVEFT", dict(wavelet_family="db0"), "wavelet_family must name a wavelet"),
    ("SUPERTUNING", dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    ("SUPERTUNING", dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    ("SUPERTUNING", dict(sparsity="high"), "sparsity must be a finite number"),
    ("SUPERTUNING", dict(r=0), "r must be a positive integer"),
    ("SUPERTUNING", dict(r=2.5), "r must be a positive integer"),
    ("SUPERTUNING", dict(lora_alpha=16), "lora_alpha=16 is set but r is None"),
    ("SUPERTUNING", dict(r=2, lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    ("SUPERTUNING", dict(select_top="largest"), "select_top must be one of"),
    ("SUPERTUNING", dict(init_weights="kaiming"), "init_weights must be one of"),
    ("SUPERTUNING", dict(save_precomputed_indices=None), "save_precomputed_indices must be one of"),
    ("FROD", dict(projection_prng_key=None), "projection_prng_key must be an integer"),
    ("FROD", dict(sparse_rate=1.5), r"sparse_rate must be in \[0, 1\]"),
    ("FROD", dict(sparse_rate="dense"), "sparse_rate must be a finite number"),
    ("FROD", dict(frod_dropout=1.0), r"frod_dropout must be in \[0, 1\)"),
    ("FROD", dict(regularization_alpha=float("nan")), "regularization_alpha must be a finite number"),
    ("FROD", dict(save_projection="yes"), "save_projection must be one of"),
    ("FROD", dict(init_weights=0), "init_weights must be one of"),
    ("FROD", dict(runtime_offload_base_weight=None), "runtime_offload_base_weight must be one of"),
    ("FROD", dict(bias="lora_only"), "bias must be one of .*'frod_only'"),
]


@pytest.mark.parametrize("peft_type,kwargs,message", BAD)
def test_bad_settings_name_the_field(peft_type, kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("case,arch", [("waveft_proportional", "gpt2"), ("supra", "neox"), ("frod", "llama"),
                                       ("frod_dense_random_key", "gpt2")])
def test_trainable_counts_are_peft_s_also_on_a_meta_model(case, arch):
    """``compare``'s parameter table attaches to a model on the meta device; FRoD's decompositions then give shapes."""
    trainable, _ = peft_model(case, arch).get_nb_trainable_parameters()
    assert peftlab.count_parameters(our_model(case, arch))[0] == trainable
    with torch.device("meta"):
        model = ARCHS[arch]()
    peftlab.attach(model, our_config(case, arch))
    assert peftlab.count_parameters(model)[0] == trainable
