"""MiSS / SHiRA / HiRA parity with HF PEFT (the oracle): both directions, keys, configs, init draws, merges, bad input.

PEFT adapts GPT-2's Conv1D with HiRA but not with MiSS / SHiRA, so those use Llama and NeoX.
"""
import peft
import pytest
import torch
from hypothesis import given, settings as hyp_settings, strategies as st
from torch import nn

import peftlab
from peftlab.core.inject import adapter_layers
from models import (
    ARCHS, ParityCases, both_ways_tests, check_config_round_trip, check_peft_file_loads_in_peftlab,
    check_peftlab_file_loads_in_peft, check_same_file_as_peft, saved_pair,
)

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "neox": ["query_key_value", "dense", "dense_4h_to_h"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_proj"],
}
EMBEDDING = {"llama": ["q_proj", "embed_tokens"], "neox": ["dense", "embed_in"], "gpt2": ["c_attn", "wte"]}

# (peft_type, settings, architectures, targets): settings are passed to both libraries' config classes.
CASES = {
    "miss": ("MISS", dict(r=4), ["llama", "neox"], TARGETS),
    "miss_padded": ("MISS", dict(r=5, miss_dropout=0.1), ["llama", "neox"], TARGETS),  # 5 divides no in_features
    "miss_bat": ("MISS", dict(r=4, init_weights="bat"), ["llama", "neox"], TARGETS),
    "miss_mini": ("MISS", dict(r=4, init_weights="mini", mini_r=8), ["llama", "neox"], TARGETS),
    "miss_mini_padded": ("MISS", dict(r=3, init_weights="mini", mini_r=16), ["llama"], TARGETS),
    "miss_bias_only": ("MISS", dict(r=4, bias="MiSS_only"), ["neox"], TARGETS),
    "shira": ("SHIRA", dict(r=2, random_seed=5), ["llama", "neox"], TARGETS),
    "shira_unseeded": ("SHIRA", dict(r=1), ["llama"], TARGETS),
    "hira": ("HIRA", dict(r=4), ["llama", "neox", "gpt2"], TARGETS),
    "hira_gaussian": ("HIRA", dict(r=2, init_weights="gaussian", hira_dropout=0.1), ["llama"], TARGETS),
    "hira_embedding": ("HIRA", dict(r=3), ["llama", "gpt2"], EMBEDDING),
}
PAIRS = [(case, arch) for case, (_, _, archs, _) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"MISS": peft.MissConfig, "SHIRA": peft.ShiraConfig, "HIRA": peft.HiraConfig}


PARITY = ParityCases(CASES, ARCHS, PEFT_CONFIGS)
settings, ours_config, peft_model = PARITY.settings, PARITY.ours, PARITY.peft_model


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = CASES[case][2][0]
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    check_same_file_as_peft(peft_model(case, arch), ours, tmp_path, save_embedding_layers=False)
    ours_w, theirs_w, _, _ = saved_pair(tmp_path)
    for key, tensor in theirs_w.items():  # SHiRA's indices: the same entries, saved as PEFT saves them (int32)
        assert ours_w[key].dtype == tensor.dtype, key
        if key.endswith("shira_indices"):
            assert torch.equal(ours_w[key], tensor), key


@pytest.mark.parametrize("case,extra", [
    ("miss", dict(init_weights=False)),
    ("shira", dict(init_weights=False)),
    ("shira_unseeded", dict(init_weights=False)),
    ("hira", {}),
    ("hira", dict(init_weights=False)),
    ("hira_gaussian", {}),
    ("hira_embedding", {}),
    ("hira_embedding", dict(init_weights=None)),
])
def test_same_seed_gives_peft_s_initial_weights(case, extra):
    """PEFT draws every factor from the global generator, layer by layer in module order (SHiRA's mask from its
    own seeded one): after the same torch.manual_seed both libraries start from the same tensors."""
    arch = CASES[case][2][0]
    torch.manual_seed(7)
    theirs = peft_model(case, arch, **extra)
    torch.manual_seed(7)
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch, **extra))
    mine = peftlab.core.state.checkpoint_tensors(ours, "default")
    state = peft.get_peft_model_state_dict(theirs)
    assert set(mine) == set(state) - {k for k in state if k.endswith("base_layer.weight")}
    for key, tensor in mine.items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize("case,arch", [("miss", "llama"), ("miss_padded", "neox"), ("miss_bat", "llama"),
                                       ("miss_mini", "neox"), ("shira", "llama"), ("hira", "gpt2"),
                                       ("hira_embedding", "llama")])
def test_merged_weights_equal_peft_s(case, arch, tmp_path):
    """merge_and_unload gives PEFT's merged weights (the same adapter loaded in both)."""
    theirs = peft_model(case, arch)
    check_peft_file_loads_in_peftlab(theirs, ARCHS[arch], tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    plain_ours = peftlab.merge_and_unload(ours).state_dict()
    plain_theirs = theirs.merge_and_unload().state_dict()
    assert plain_ours.keys() == plain_theirs.keys()
    for key, value in plain_theirs.items():
        torch.testing.assert_close(plain_ours[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_shira_with_a_custom_mask_loads_from_peft_but_is_not_built_here(tmp_path):
    """PEFT's custom mask functions are not saved, only the indices they chose: the file loads (indices from it),
    a new adapter of that mask_type is refused by name."""
    def diagonal_band(base_layer, r, **kwargs):
        out_f, in_f = base_layer.weight.shape
        scores = torch.arange(out_f * in_f, dtype=torch.float32).reshape(out_f, in_f).remainder(7)
        mask = torch.zeros(out_f * in_f)
        mask[scores.flatten().argsort(stable=True)[: r * (in_f + out_f)]] = 1.0
        return mask.reshape(out_f, in_f).to(base_layer.weight)

    config = peft.ShiraConfig(r=2, mask_type="band", target_modules=TARGETS["llama"])
    config.mask_fn = diagonal_band
    theirs = peft.get_peft_model(ARCHS["llama"](), config).eval()
    ours = check_peft_file_loads_in_peftlab(theirs, ARCHS["llama"], tmp_path)
    layer = next(layer for _, _, layer in adapter_layers(ours))
    assert not torch.equal(layer.shira_indices, peftlab.methods.shira.random_entries(32, 32, 128, None))
    with pytest.raises(peftlab.ConfigError, match="mask_type='band': only 'random' masks can be built"):
        peftlab.attach(ARCHS["llama"](), peftlab.ShiraConfig(r=2, mask_type="band", target_modules=["q_proj"]))


def test_shira_indices_saved_as_floats_load_as_ints(tmp_path):
    """PEFT saves the indices as float32 on Windows and casts them back on load; so does peftlab's load."""
    from safetensors.torch import load_file, save_file

    theirs = peft_model("shira", "llama")
    expected = check_peft_file_loads_in_peftlab(theirs, ARCHS["llama"], tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.float() if k.endswith("shira_indices") else v for k, v in tensors.items()}, weights)
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path)
    for (_, _, mine), (_, _, ref) in zip(adapter_layers(ours), adapter_layers(expected)):
        assert mine.shira_indices.dtype == torch.int32 and torch.equal(mine.shira_indices, ref.shira_indices)


def test_hira_rank_pattern_is_kept_but_changes_no_rank_as_in_peft(tmp_path):
    with pytest.warns(UserWarning, match="rank_pattern=.* has no effect"):
        config = ours_config("hira", "llama", rank_pattern={"v_proj": 2})
    theirs = peft_model("hira", "llama", rank_pattern={"v_proj": 2})
    assert theirs.base_model.model.model.layers[0].self_attn.v_proj.hira_A["default"].shape == (4, 32)
    check_peft_file_loads_in_peftlab(theirs, ARCHS["llama"], tmp_path / "peft")
    check_peftlab_file_loads_in_peft(ARCHS["llama"], config, tmp_path / "ours")


def test_hira_unmerge_through_a_zero_factor_is_refused():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.HiraConfig(r=1, target_modules=["q_proj"]))
    layer = next(layer for _, _, layer in adapter_layers(model))
    with torch.no_grad():
        layer.hira_A.fill_(1.0)
        layer.hira_B.fill_(-1.0)  # 1 + B A = 0 everywhere: the merge zeroes the weight
    peftlab.merge(model)
    with pytest.raises(peftlab.AdapterError, match="1 \\+ B A is exactly 0"):
        peftlab.unmerge(model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    check_config_round_trip(ours_config(case, CASES[case][2][0]))


@pytest.mark.parametrize("peft_type,kwargs,match", [
    ("MISS", dict(r=0), "r must be a positive integer"),
    ("MISS", dict(mini_r=2.5), "mini_r must be a positive integer"),
    ("MISS", dict(miss_dropout=1.0), "miss_dropout"),
    ("MISS", dict(init_weights="bone"), "init_weights must be one of"),
    ("MISS", dict(bias="miss_only"), "bias must be one of .*'MiSS_only'"),
    ("SHIRA", dict(r=-1), "r must be a positive integer"),
    ("SHIRA", dict(random_seed="seven"), "random_seed"),
    ("SHIRA", dict(init_weights="zeros"), "init_weights must be one of"),
    ("HIRA", dict(r=0), "r must be a positive integer"),
    ("HIRA", dict(hira_dropout=-0.1), "hira_dropout"),
    ("HIRA", dict(init_weights="orthogonal"), "init_weights must be one of"),
    ("HIRA", dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
])
def test_bad_settings_name_the_field(peft_type, kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("config,match", [
    (peftlab.MissConfig(r=33, target_modules=["q_proj"]), r"r=33 must be <= in_features=32"),
    (peftlab.MissConfig(r=5, init_weights="bat", target_modules=["q_proj"]), r"'bat'.*r=5 must divide in_features=32"),
    (peftlab.MissConfig(r=4, init_weights="mini", mini_r=5, target_modules=["q_proj"]), r"mini_r=5 must divide out"),
    (peftlab.ShiraConfig(r=11, target_modules=["v_proj"]), r"r=11 gives r \* \(in \+ out\) = 528 trainable entries"),
])
def test_shapes_a_layer_cannot_take_are_refused_by_name(config, match):
    model = ARCHS["llama"]()
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(model, config)
    assert not peftlab.list_adapters(model)


def test_unsupported_peft_options_and_unknown_keys_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'mini_r' for ShiraConfig"):
        peftlab.config_from_dict({"peft_type": "SHIRA", "target_modules": ["q_proj"], "mini_r": 2})
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "HIRA", "target_modules": ["q_proj"], "lora_alpha": 8})


def test_miss_bat_forward_is_peft_s_dense_update_of_the_base_weight():
    """'bat' is the one variant whose update reads W0: W' blocks are W_kj (I + D_k) + D_k."""
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.MissConfig(r=4, init_weights="bat", target_modules=["q_proj"]))
    module = model.model.layers[0].self_attn.q_proj
    block = module.adapters["default"].miss_block
    with torch.no_grad():
        block.normal_(std=0.1)
        w = module.base_layer.weight.clone()
        expected = w.clone()
        for k in range(8):
            for j in range(8):
                blk = w[4 * k:4 * k + 4, 4 * j:4 * j + 4]
                expected[4 * k:4 * k + 4, 4 * j:4 * j + 4] = blk @ (torch.eye(4) + block[k]) + block[k]
        x = torch.randn(3, 32)
        torch.testing.assert_close(module(x), x @ expected.t(), atol=1e-5, rtol=1e-5)
        peftlab.merge(model)
        torch.testing.assert_close(module.base_layer.weight, expected, atol=1e-6, rtol=1e-5)
        peftlab.unmerge(model)
        torch.testing.assert_close(module.base_layer.weight, w, atol=1e-5, rtol=1e-5)


# -- properties (hypothesis): each layer against a direct reference of its formula, any shapes it accepts -----------


def _holder(module, config, seed):
    torch.manual_seed(seed)
    holder = nn.Sequential(module)
    peftlab.attach(holder, config)
    layer = holder[0].adapters["default"]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return holder, layer


def _check_forward_and_merge(holder, x, expected):
    with torch.no_grad():
        out = holder(x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        before = holder[0].base_layer.weight.clone()
        peftlab.merge(holder)
        torch.testing.assert_close(holder(x), out, atol=1e-4, rtol=1e-4)
        peftlab.unmerge(holder)
        torch.testing.assert_close(holder[0].base_layer.weight, before, atol=1e-4, rtol=1e-4)


@hyp_settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 20), out_f=st.integers(1, 20), r=st.integers(1, 20), variant=st.sampled_from(
    [True, "mini", "bat"]), mini_r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_miss_forward_is_the_shared_block_tiled_over_the_weight(in_f, out_f, r, variant, mini_r, seed):
    r = min(r, in_f)
    if variant == "bat":
        r = next(d for d in range(min(r, in_f, out_f), 0, -1) if in_f % d == 0 and out_f % d == 0)
    if variant == "mini":
        mini_r = next(d for d in range(min(mini_r, out_f), 0, -1) if out_f % d == 0)
    config = peftlab.MissConfig(r=r, mini_r=mini_r, init_weights=variant, target_modules=["0"])
    holder, layer = _holder(nn.Linear(in_f, out_f), config, seed)
    w, d = holder[0].base_layer.weight, layer.miss_block
    delta = torch.zeros(out_f, in_f)
    for o in range(out_f):
        for i in range(in_f):
            if variant == "bat":
                k, a, j, b = o // r, o % r, i // r, i % r
                delta[o, i] = w[k * r + a, j * r:(j + 1) * r] @ d[k, :, b] + d[k, a, b]
            else:
                delta[o, i] = d[i % r, o % d.shape[1]]
    x = torch.randn(2, 3, in_f)
    _check_forward_and_merge(holder, x, x @ (w + delta).t() + holder[0].base_layer.bias)


@hyp_settings(max_examples=30, deadline=None)
@given(in_f=st.integers(2, 20), out_f=st.integers(2, 20), r=st.integers(1, 4), seed=st.integers(0, 2**16),
       random_seed=st.one_of(st.none(), st.integers(0, 2**31)))
def test_shira_trains_exactly_its_entries(in_f, out_f, r, seed, random_seed):
    if r * (in_f + out_f) > in_f * out_f:
        r = 1
        if in_f + out_f > in_f * out_f:
            return
    config = peftlab.ShiraConfig(r=r, random_seed=random_seed, target_modules=["0"])
    holder, layer = _holder(nn.Linear(in_f, out_f), config, seed)
    rows, cols = layer.shira_indices.long()
    assert len(set(zip(rows.tolist(), cols.tolist()))) == r * (in_f + out_f)  # distinct positions, row-major
    assert (rows * in_f + cols).diff().gt(0).all()
    w = holder[0].base_layer.weight.clone()
    with torch.no_grad():
        w[rows, cols] += layer.shira_weight
    x = torch.randn(4, in_f)
    _check_forward_and_merge(holder, x, x @ w.t() + holder[0].base_layer.bias)


@hyp_settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 20), out_f=st.integers(1, 20), r=st.integers(1, 6), embedding=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hira_gates_the_base_weight_entrywise(in_f, out_f, r, embedding, seed):
    module = nn.Embedding(in_f, out_f) if embedding else nn.Linear(in_f, out_f)
    holder, layer = _holder(module, peftlab.HiraConfig(r=r, target_modules=["0"]), seed)
    a, b = layer.factors()
    w = holder[0].base_layer.weight  # (out, in) for the linear, (num, dim) = (in, out) for the embedding
    gated = w * (b @ a).t() if embedding else w * (b @ a)
    if embedding:
        ids = torch.randint(0, in_f, (2, 5))
        _check_forward_and_merge(holder, ids, (w + gated)[ids])
        return
    x = torch.randn(3, in_f)
    _check_forward_and_merge(holder, x, x @ (w + gated).t() + holder[0].base_layer.bias)
