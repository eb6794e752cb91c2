"""PVeRA / TinyLoRA / Uni-LoRA parity with HF PEFT (the oracle): both directions, keys / shapes / config fields,
seeded init, merged weights, each method's own rules (PVeRA's sampling in train vs eval, TinyLoRA's tying groups and
SVD factors, Uni-LoRA's balanced indices), and bad input.

PEFT sets ``fan_in_fan_out`` itself on GPT-2's Conv1D (with a warning) and saves it so; the GPT-2 cases pass it to
both libraries, as the VB-LoRA tests do.
"""
import json

import peft
import pytest
import torch

import peftlab
from models import (
    ARCHS, ParityCases, batch, both_ways_tests, check_config_round_trip, check_merged_model_matches_peft,
    check_same_file_as_peft, logits, randomize_adapters,
)
from peftlab.core.inject import adapter_layers, model_state

TARGETS = {
    "llama": ["q_proj", "k_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
}
EMBEDDING_TARGETS = {"llama": ["embed_tokens", "q_proj", "down_proj"]}


class Cases(ParityCases):
    def settings(self, case, arch, **extra):
        peft_type, kwargs = super().settings(case, arch, **extra)
        return peft_type, ({**kwargs, "fan_in_fan_out": True} if arch == "gpt2" else kwargs)


CASES = Cases({
    "pvera": ("PVERA", dict(r=4, projection_prng_key=3), ["llama", "gpt2"], TARGETS),
    "pvera_no_projection": ("PVERA", dict(r=8, save_projection=False, d_initial=0.3, pvera_dropout=0.1), ["llama"],
                            TARGETS),
    "pvera_sampling": ("PVERA", dict(r=4, sample_at_inference=True, generator_seed=5), ["llama", "neox"], TARGETS),
    "pvera_bias_only": ("PVERA", dict(r=2, bias="pvera_only"), ["neox"], TARGETS),
    "pvera_bias_all": ("PVERA", dict(r=2, bias="all"), ["gpt2"], TARGETS),
    "tinylora": ("TINYLORA", dict(r=2, u=4), ["llama", "gpt2"], TARGETS),
    "tinylora_tied_uniform": ("TINYLORA", dict(r=3, u=5, weight_tying=0.5, init_weights="uniform"), ["llama", "neox"],
                              TARGETS),
    "tinylora_one_v_no_projection": ("TINYLORA", dict(r=2, u=7, weight_tying=1.0, save_projection=False,
                                                      projection_seed=3, tinylora_dropout=0.1), ["llama", "gpt2"],
                                     TARGETS),
    "tinylora_embedding": ("TINYLORA", dict(r=2, u=3, init_weights="uniform", init_v_bound=0.3), ["llama"],
                           EMBEDDING_TARGETS),
    "tinylora_bias_only": ("TINYLORA", dict(r=2, u=4, bias="tinylora_only"), ["neox"], TARGETS),
    "unilora": ("UNILORA", dict(r=2, theta_d_length=100), ["llama", "gpt2"], TARGETS),
    "unilora_saved_indices": ("UNILORA", dict(r=3, theta_d_length=64, save_indices=True, init_weights=False,
                                              proj_seed=9), ["llama", "gpt2"], TARGETS),
    "unilora_dropout_bias": ("UNILORA", dict(r=2, unilora_dropout=0.1, init_theta_d_bound=0.2, bias="unilora_only"),
                             ["neox"], TARGETS),
    "unilora_bias_all": ("UNILORA", dict(r=2, theta_d_length=5000, bias="all"), ["neox"], TARGETS),
}, ARCHS, {"PVERA": peft.PveraConfig, "TINYLORA": peft.TinyLoraConfig, "UNILORA": peft.UniLoraConfig})
PAIRS = CASES.pairs
ours_config, peft_model = CASES.ours, CASES.peft_model


def ours_model(case, arch, **extra):
    model = ARCHS[arch]()
    peftlab.attach(model, ours_config(case, arch, **extra))
    return model


def copy_peft_weights(theirs, ours):
    """PEFT's adapter tensors (trained and frozen) into ours, by key."""
    theirs_state = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    with torch.no_grad():
        for key, value in peftlab.core.state.checkpoint_tensors(ours, "default").items():
            value.copy_(theirs_state[key])


# -- both directions, the file, the config -------------------------------------------------------
test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_keys_shapes_dtypes_and_config_fields_as_peft(case, arch, tmp_path):
    from safetensors.torch import load_file

    check_same_file_as_peft(peft_model(case, arch), ours_model(case, arch), tmp_path, save_embedding_layers=False)
    ours, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "peft"))
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}


@pytest.mark.parametrize("case", sorted(CASES.cases))
def test_config_round_trip(case):
    check_config_round_trip(ours_config(case, CASES.first_arch(case)))


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_seed_gives_peft_s_initial_adapter(case, arch):
    """The same global seed before attaching gives every tensor PEFT's adapter holds (trained, frozen, shared, drawn
    from a seed or from the base's SVD), bit for bit, and its outputs."""
    torch.manual_seed(7)
    theirs = peft_model(case, arch)
    torch.manual_seed(7)
    ours = ours_model(case, arch)
    theirs_state = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    ours_state = peftlab.core.state.checkpoint_tensors(ours, "default")
    assert set(ours_state) == set(theirs_state)
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[key]), key
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case,arch", [("pvera", "llama"), ("pvera_no_projection", "llama"),
                                       ("tinylora", "gpt2"), ("tinylora_embedding", "llama"),
                                       ("tinylora_tied_uniform", "neox"), ("unilora", "llama"), ("unilora", "gpt2")])
def test_merged_weight_and_model_are_peft_s(case, arch, tmp_path):
    """delta_weight (what merging adds, as (out, in)) equals PEFT's get_delta_weight (in the base's own orientation)
    on every layer, and merge_and_unload gives PEFT's merged model."""
    theirs = peft_model(case, arch)
    randomize_adapters(theirs, seed=5)
    ours = ours_model(case, arch)
    copy_peft_weights(theirs, ours)
    modules = dict(theirs.base_model.model.named_modules())
    for module_name, _, layer in adapter_layers(ours):
        expected = modules[module_name].get_delta_weight("default")
        transposed = ours.get_submodule(module_name).view.transposed  # Conv1D, embedding: (in, out)
        torch.testing.assert_close(layer.delta_weight(), expected.t() if transposed else expected,
                                   atol=1e-6, rtol=1e-5)
    check_merged_model_matches_peft(peft_model(case, arch), ARCHS[arch], tmp_path)


# -- PVeRA: the mean in eval, a sample in training ------------------------------------------------
@pytest.mark.parametrize("generator_seed", [None, 11])
def test_pvera_training_forward_samples_as_peft_does(generator_seed, tmp_path):
    """In training mode the code is sampled: with ``generator_seed`` from each layer's own generator, else from the
    global RNG; either way two libraries fed the same draws give the same outputs, call after call."""
    theirs = peft_model("pvera", "llama", generator_seed=generator_seed)
    randomize_adapters(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path, inference_mode=False)
    theirs.train()
    ours.train()
    x = batch()
    outputs = []
    for _ in range(2):
        torch.manual_seed(1)
        expected = theirs(x).logits
        torch.manual_seed(1)
        torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=1e-4)
        outputs.append(expected)
    assert (generator_seed is None) == torch.equal(*outputs)  # a generator moves on; the reseeded global RNG not


def test_pvera_eval_is_the_mean_and_training_adds_noise():
    model = ours_model("pvera", "llama")
    x = batch()
    with torch.no_grad():
        model.train()
        assert torch.equal(model(x).logits, model.eval()(x).logits)  # Λ_b = 0: identity at init, sampled or not
        randomize_adapters(model)
        mean = model(x).logits
        assert torch.equal(model(x).logits, mean)
        model.train()
        noisy = model(x).logits
        assert not torch.allclose(noisy, mean, atol=1e-3) and not torch.allclose(model(x).logits, noisy, atol=1e-3)
        model.eval()
        peftlab.merge(model)  # the mean's update
        torch.testing.assert_close(model(x).logits, mean, atol=1e-5, rtol=1e-4)


def test_pvera_projections_are_veras_with_twice_the_rows_of_a():
    """From the same key PVeRA's A draws 2r rows where VeRA's draws r, in the same order: its mean rows are VeRA's A;
    B follows the longer draw. Frozen buffers, outside the parameters; each layer uses a corner of each."""
    model = ours_model("pvera", "llama")
    shared = model_state(model).shared["default"]
    assert shared.pvera_A.shape == (8, 48) and shared.pvera_B.shape == (48, 4)  # largest in / out over targets
    assert not any(p is shared.pvera_A or p is shared.pvera_B for p in model.parameters())
    vera = ARCHS["llama"]()
    peftlab.attach(vera, peftlab.VeraConfig(r=4, projection_prng_key=3, target_modules=TARGETS["llama"]))
    assert torch.equal(shared.pvera_A[:4], model_state(vera).shared["default"].vera_A)
    layer = model.model.layers[0].self_attn.k_proj.adapters["default"]  # (16, 32)
    a, b = shared.sliced(layer.in_features, layer.out_features)
    assert a.shape == (8, 32) and b.shape == (16, 4)


# -- TinyLoRA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_tying", [0.0, 0.1, 0.3, 0.5, 0.75, 0.99, 1.0])
def test_tinylora_tying_groups_are_peft_s(weight_tying):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(ARCHS["llama"](layers=3), peft.TinyLoraConfig(
        r=2, u=2, weight_tying=weight_tying, target_modules=targets))
    ours = ARCHS["llama"](layers=3)
    peftlab.attach(ours, peftlab.TinyLoraConfig(r=2, u=2, weight_tying=weight_tying, target_modules=targets))
    shared = model_state(ours).shared["default"]
    modules = dict(theirs.base_model.model.named_modules())
    assert len(shared.group) == 21
    for name, group in shared.group.items():
        assert str(group) == modules[name]._tinylora_v_key["default"], name
    assert {k.removeprefix("tinylora_v.") for k in shared.state_tensors()} == set(theirs.base_model.tinylora_v["default"])


def test_tinylora_factors_are_the_base_svd_and_only_v_trains():
    model = ours_model("tinylora_embedding", "llama")
    for name, _, layer in adapter_layers(model):
        view = model.get_submodule(name).view
        table = view.weight_oi().t() if view.kind == "embedding" else view.weight_oi()
        s = torch.linalg.svdvals(table)[:2]
        torch.testing.assert_close(layer.tinylora_A.norm(dim=1) ** 2, s)  # sqrt(S) V^T: row norms^2 are S
        torch.testing.assert_close(layer.tinylora_B @ layer.tinylora_A, table - _residual(table, 2), atol=1e-5,
                                   rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".tinylora_v") for n in trainable)


def _residual(table, r):
    u, s, vh = torch.linalg.svd(table, full_matrices=False)
    return table - (u[:, :r] * s[:r]) @ vh[:r]


def test_tinylora_projections_come_from_the_seed_when_not_saved(tmp_path):
    model = ours_model("tinylora_one_v_no_projection", "llama")
    randomize_adapters(model)
    peftlab.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is False
    x = batch()
    fresh = ARCHS["llama"]()
    peftlab.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, x), logits(model, x))
    other = ARCHS["llama"]()
    peftlab.load_adapter(other, tmp_path, projection_seed=4)
    assert not torch.allclose(logits(other, x), logits(model, x), atol=1e-4)


def test_tinylora_load_takes_a_and_b_from_the_file_without_an_svd(tmp_path, monkeypatch):
    """A and B come from the file (here: factors of another base than the one loaded into), so the SVD is skipped."""
    theirs = peft_model("tinylora", "llama")
    randomize_adapters(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    x = batch()
    expected = logits(theirs, x)
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path)
    assert calls == []
    torch.testing.assert_close(logits(ours, x), expected, atol=1e-5, rtol=1e-4)
    other_base = ARCHS["llama"](seed=1)
    peftlab.load_adapter(other_base, tmp_path)
    layer = other_base.model.layers[0].self_attn.q_proj.adapters["default"]
    assert torch.equal(layer.tinylora_A, ours.model.layers[0].self_attn.q_proj.adapters["default"].tinylora_A)


# -- Uni-LoRA -------------------------------------------------------------------------------------
def test_unilora_indices_are_balanced_and_scaled_by_their_use():
    model = ours_model("unilora", "llama")
    layers = [layer for _, _, layer in adapter_layers(model)]
    flat = torch.cat([t.flatten() for layer in layers for t in (layer.unilora_indices_A, layer.unilora_indices_B)])
    counts = torch.bincount(flat, minlength=100)
    assert counts.max() - counts.min() <= 1 and counts.sum() == flat.numel()
    for layer in layers:
        torch.testing.assert_close(layer.unilora_scales_A, counts[layer.unilora_indices_A].float().rsqrt())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("unilora_theta_d")  # one vector for the whole model


def test_unilora_saved_indices_win_over_the_seed(tmp_path):
    """With save_indices the file's indices are loaded (another proj_seed changes nothing); without, they come from
    proj_seed again (another seed, another model)."""
    x = batch()
    for case, same in (("unilora_saved_indices", True), ("unilora", False)):
        model = ours_model(case, "llama")
        randomize_adapters(model)
        peftlab.save_adapter(model, tmp_path / case)
        other = ARCHS["llama"]()
        peftlab.load_adapter(other, tmp_path / case, proj_seed=123)
        assert torch.equal(logits(other, x), logits(model, x)) == same, case


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_type,kwargs,match", [
    ("PVERA", dict(r=0), "r must be a positive integer"),
    ("PVERA", dict(pvera_dropout=1.0), "pvera_dropout"),
    ("PVERA", dict(projection_prng_key=1.5), "projection_prng_key"),
    ("PVERA", dict(generator_seed="x"), "generator_seed"),
    ("PVERA", dict(d_initial=float("inf")), "d_initial"),
    ("PVERA", dict(bias="vera_only"), "bias must be one of .*'pvera_only'"),
    ("TINYLORA", dict(r=-2), "r must be a positive integer"),
    ("TINYLORA", dict(u=0), "u must be a positive integer"),
    ("TINYLORA", dict(weight_tying=1.5), r"weight_tying must be in \[0, 1\]"),
    ("TINYLORA", dict(weight_tying="all"), "weight_tying"),
    ("TINYLORA", dict(projection_seed=None), "projection_seed"),
    ("TINYLORA", dict(init_weights="gaussian"), "init_weights must be one of"),
    ("TINYLORA", dict(tinylora_dropout=-0.1), "tinylora_dropout"),
    ("TINYLORA", dict(bias="lora_only"), "bias must be one of .*'tinylora_only'"),
    ("UNILORA", dict(r=1.0), "r must be a positive integer"),
    ("UNILORA", dict(theta_d_length=0), "theta_d_length must be a positive integer"),
    ("UNILORA", dict(init_theta_d_bound=0), "init_theta_d_bound must be positive"),
    ("UNILORA", dict(proj_seed="seed"), "proj_seed"),
    ("UNILORA", dict(unilora_dropout=2), "unilora_dropout"),
    ("UNILORA", dict(bias="pvera_only"), "bias must be one of .*'unilora_only'"),
])
def test_bad_settings_name_the_field(peft_type, kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


def test_unknown_keys_and_unsupported_targets_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'vera_dropout'"):
        peftlab.config_from_dict({"peft_type": "PVERA", "target_modules": ["q_proj"], "vera_dropout": 0.1})
    for config in (peftlab.PveraConfig(r=2, target_modules=["embed_tokens"]),
                   peftlab.UniLoraConfig(r=2, target_modules=["embed_tokens"])):
        with pytest.raises((peftlab.ConfigError, peftlab.AdapterError), match="embed"):
            peftlab.attach(ARCHS["llama"](), config)


def test_checkpoint_without_the_projections_it_declares_is_refused(tmp_path):
    peft_model("pvera_no_projection", "llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "save_projection": True}))
    with pytest.raises(peftlab.CheckpointError, match=r"missing \['base_model.pvera_A', 'base_model.pvera_B'\]"):
        peftlab.load_adapter(ARCHS["llama"](), tmp_path)


@pytest.mark.parametrize("case", ["pvera", "tinylora_tied_uniform", "unilora_saved_indices"])
def test_trainable_count_on_the_meta_device_is_peft_s(case):
    """Attaching to a model without weights (``compare``'s parameter table) works and counts what PEFT trains."""
    model = ARCHS["llama"]()
    with torch.device("meta"):
        empty = type(model)(model.config)
    peftlab.attach(empty, ours_config(case, "llama"))
    assert peftlab.count_parameters(empty)[0] == peft_model(case, "llama").get_nb_trainable_parameters()[0]
