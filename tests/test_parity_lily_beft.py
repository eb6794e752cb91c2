"""Lily and BEFT parity with HF PEFT (the oracle): checkpoints both ways, keys, shapes and config fields, seeded init,
gradients (Lily's shared A and B), merged weights (BEFT), and bad settings.

PEFT adapts only nn.Linear with both methods, so the cases use Llama and Qwen2 (whose q/k/v projections have biases,
into which BEFT merges).
"""
import peft
import pytest
import torch

import peftlab
from peftlab.core.inject import adapter_layers, model_state
from models import (ARCHS, batch, both_ways_tests, check_merged_model_matches_peft, check_same_seeded_save_as_peft,
                    logits, saved_pair, tiny_llama)

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "down_proj"]}
# (peft_type, settings, architectures, targets by architecture or None for TARGETS)
CASES = {
    "lily": ("LILY", dict(r=4), ["llama", "qwen2"], None),
    "lily_shared": ("LILY", dict(r=6, stride_A=2, num_B=3, scaling=0.5), ["llama"], None),
    "lily_random_b": ("LILY", dict(r=4, stride_A=3, num_B=2, init_weights=False), ["llama"], None),
    "lily_regex": ("LILY", dict(r=4, stride_A=2), ["llama"], r".*\.(q_proj|k_proj|up_proj)"),
    "lily_all_linear": ("LILY", dict(r=2, num_B=2), ["llama", "llama2"], "all-linear"),
    "beft": ("BEFT", dict(), ["llama", "qwen2"], None),
    "beft_random": ("BEFT", dict(init_weights=False), ["qwen2"], None),
}
PAIRS = [(case, arch) for case, (_, _, archs, _) in CASES.items() for arch in archs]
ARCHS = {**ARCHS, "llama2": ARCHS["llama"]}
TARGETS["llama2"] = TARGETS["llama"]
PEFT_CONFIGS = {"LILY": peft.LilyConfig, "BEFT": peft.BeftConfig}


def three_layers(arch):
    """Llama with three decoder layers, so stride_A=2 leaves a block of one and the shared tensors span layers
    unevenly ("llama2": two, so all-linear's 14 targets stay below PEFT's condensation of 20 names to suffixes)."""
    return (lambda seed=0: tiny_llama(seed, layers=3)) if arch == "llama" else ARCHS[arch]


def settings(case, arch):
    peft_type, kwargs, _, targets = CASES[case]
    return peft_type, dict(kwargs, target_modules=TARGETS[arch] if targets is None else targets)


def our_config(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peftlab.lookup(peft_type).config(**kwargs)


def peft_model(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peft.get_peft_model(three_layers(arch)(), PEFT_CONFIGS[peft_type](**kwargs)).eval()


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, our_config, {arch: three_layers(arch) for _, arch in PAIRS})


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_seed_gives_peft_s_tensors_keys_and_config(case, arch, tmp_path):
    """Built after the same seed, both save the same tensors (Lily: PEFT's throwaway nn.Linear draws included, and
    the shared A and B under every layer's keys) and the same config fields (but "all-linear", which PEFT saves
    expanded to the names it matched)."""
    make_peft = lambda: peft_model(case, arch)  # noqa: E731
    make_ours = lambda: peftlab.attach(three_layers(arch)(), our_config(case, arch))  # noqa: E731
    if CASES[case][3] != "all-linear":
        check_same_seeded_save_as_peft(make_peft, make_ours, tmp_path)
        return
    torch.manual_seed(0)
    make_peft().save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    peftlab.save_adapter(make_ours(), tmp_path / "ours")
    ours, theirs, _, their_cfg = saved_pair(tmp_path)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    expanded = peftlab.read_config(tmp_path / "peft").target_modules  # full names below 20 targets, else leaves
    assert len(expanded) == (7 if arch == "llama" else 14)


def _lily_tensors(case):
    model = peftlab.attach(tiny_llama(layers=3), our_config(case, "llama"))
    return {name: layer for name, _, layer in adapter_layers(model)}, model


def test_lily_sharing_follows_stride_and_groups():
    layers, model = _lily_tensors("lily_shared")
    q = [layers[f"model.layers.{i}.self_attn.q_proj"] for i in range(3)]
    v0 = layers["model.layers.0.self_attn.v_proj"]
    assert q[0].lily_A is q[1].lily_A and q[2].lily_A is not q[0].lily_A  # stride_A=2: blocks {0, 1}, {2}
    assert q[0].lily_B is q[1].lily_B is q[2].lily_B and v0.lily_B is not q[0].lily_B  # one B per target group
    assert q[0].lily_router is not q[1].lily_router
    trainable, _ = peftlab.count_parameters(model)
    r, num_b = 6, 3  # per group: 2 A's, 1 B, 3 routers
    per_group = lambda i, o: 2 * r * i + num_b * r * o + 3 * num_b * r  # noqa: E731
    assert trainable == per_group(32, 32) + per_group(32, 16) + per_group(48, 32)  # q, v (2 KV heads), down
    layers, _ = _lily_tensors("lily_all_linear")  # 21 full names, condensed by PEFT to the 7 leaf names
    assert len({id(layer.lily_B) for layer in layers.values()}) == 7
    two = peftlab.attach(tiny_llama(), our_config("lily_all_linear", "llama"))  # 14 full names: a group each
    assert len({id(layer.lily_B) for _, _, layer in adapter_layers(two)}) == 14


def test_lily_gradients_equal_peft_s():
    """The shared A and B sum their gradients over every layer that uses them, as PEFT's shared modules do."""
    theirs = peft_model("lily_random_b", "llama")
    torch.manual_seed(7)
    ours = peftlab.attach(tiny_llama(layers=3), our_config("lily_random_b", "llama"))
    state = theirs.state_dict()
    with torch.no_grad():  # the same values as PEFT's (drawn from another seed state than ours)
        for name, _, layer in adapter_layers(ours):
            for key, tensor in layer.state_tensors().items():
                module, param = key.split(".")
                tensor.copy_(state[f"base_model.model.{name}.{module}.default.{param}"])
    x = batch(b=3, t=7)
    for model in (theirs, ours):
        model(x, labels=x).loss.backward()
    for name, _, layer in adapter_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        for key, tensor in layer.state_tensors().items():
            module = key.split(".")[0]
            torch.testing.assert_close(tensor.grad, getattr(peft_layer, module)["default"].weight.grad,
                                       atol=1e-6, rtol=1e-4, msg=f"{name}.{key}")


def test_lily_output_depends_on_the_whole_batch_and_is_not_mergeable():
    model = peftlab.attach(tiny_llama(), our_config("lily_random_b", "llama"))
    x = batch(b=2)
    together = logits(model, x)
    alone = logits(model, x[:1])
    assert not torch.allclose(together[:1], alone, atol=1e-5)  # the router's mixture is a mean over the batch
    with pytest.raises(peftlab.AdapterError, match="not mergeable"):
        peftlab.merge(model)


def test_beft_merges_into_biases_as_peft(tmp_path):
    peft_type, kwargs = settings("beft", "qwen2")
    kwargs["target_modules"] = ["q_proj", "k_proj", "v_proj"]  # all with biases
    check_merged_model_matches_peft(peft.get_peft_model(ARCHS["qwen2"](), peft.BeftConfig(**kwargs)).eval(),
                                    ARCHS["qwen2"], tmp_path)


def test_beft_refuses_to_merge_a_layer_without_bias():
    model = peftlab.attach(tiny_llama(), our_config("beft", "llama"))
    with pytest.raises(peftlab.AdapterError, match="not mergeable"):
        peftlab.merge(model)
    assert not any(module.merged for module in model.modules() if isinstance(module, peftlab.AdaptedModule))


def test_lily_shared_tensors_live_once_per_adapter():
    _, model = _lily_tensors("lily")
    shared = model_state(model).shared["default"]
    assert shared.state_tensors() == {} and not shared.initial_routers  # saved per layer; routers handed over


@pytest.mark.parametrize("peft_type,field,value,match", [
    ("LILY", "r", 0, "r must be a positive integer"),
    ("LILY", "stride_A", 0, "stride_A must be a positive integer"),
    ("LILY", "num_B", 1, "num_B must be at least 2"),
    ("LILY", "num_B", 2.0, "num_B must be a positive integer"),
    ("LILY", "scaling", "big", "scaling must be a finite number"),
    ("LILY", "init_weights", "yes", "init_weights must be one of"),
    ("BEFT", "init_weights", 1, "init_weights must be one of"),
])
def test_bad_settings_are_refused_by_name(peft_type, field, value, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **{field: value})


def test_lily_layers_pattern_needs_layers_to_transform():
    with pytest.raises(peftlab.ConfigError, match="layers_pattern needs layers_to_transform"):
        peftlab.LilyConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_gpt2_conv1d_is_adapted_here_though_peft_refuses_it(tmp_path):
    """An extension: GPT-2's Conv1D through its (out, in) view. BEFT merges into its biases; Lily saves and reloads."""
    x = batch()
    beft = peftlab.attach(ARCHS["gpt2"](), peftlab.BeftConfig(target_modules=["c_attn", "mlp.c_proj"],
                                                               init_weights=False))
    expected = logits(beft, x)
    torch.testing.assert_close(logits(peftlab.merge_and_unload(beft), x), expected, atol=1e-5, rtol=1e-5)
    lily = peftlab.attach(ARCHS["gpt2"](), peftlab.LilyConfig(target_modules=["c_attn", "c_fc"], r=4,
                                                               init_weights=False))
    expected = logits(lily, x)
    peftlab.save_adapter(lily, tmp_path)
    torch.testing.assert_close(logits(peftlab.load_adapter(ARCHS["gpt2"](), tmp_path), x), expected, atol=0, rtol=0)


def test_a_file_shared_otherwise_is_refused_by_key(tmp_path):
    """PEFT's file with a layer's own A (stride_A=1) cannot load into A's shared by pairs of layers: the keys that
    would fill one tensor differ, and core names them instead of keeping one silently."""
    theirs = peft_model("lily", "llama")
    for p in theirs.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    theirs.save_pretrained(tmp_path)
    model = tiny_llama(layers=3)
    with pytest.raises(peftlab.CheckpointError, match=r"layers\.0\.self_attn\.q_proj\.lily_A\.weight'.*layers\.1"):
        peftlab.load_adapter(model, tmp_path, stride_A=2)
    assert not peftlab.list_adapters(model)
