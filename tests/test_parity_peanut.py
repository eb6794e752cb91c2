"""PEANuT parity with HF PEFT (the oracle): checkpoints both ways, keys / shapes / config fields, seeded init, logits,
gradients and merged weights, the network against PEFT's ΔW layer by layer, merging, and bad input.

PEFT adapts nn.Linear only, so the parity cases use Llama and Qwen2 (whose q/k/v carry biases); GPT-2's Conv1D is
adapted here through its (out, in) view, checked against the einsum form of the update.
"""
import peft
import pytest
import torch

import peftlab
from models import (
    ARCHS, ParityCases, batch, both_ways_tests, check_config_round_trip, check_fast_path_matches_reference,
    check_merge_unmerge, check_merged_model_matches_peft, check_same_file_as_peft,
    check_same_logits_gradients_and_merge_as_peft, check_same_seeded_save_as_peft, logits, randomize_adapters,
)
from peftlab.core.inject import adapted_modules, adapter_layers
from peftlab.methods.peanut import peanut_hidden, peanut_weight

TARGETS = {
    "llama": ["q_proj", "k_proj", "up_proj", "down_proj"],  # square, in > out, in < out
    "qwen2": ["q_proj", "v_proj", "o_proj", "gate_proj"],
}
CASES = ParityCases({
    "peanut": ("PEANUT", dict(r=4), ["llama", "qwen2"], TARGETS),
    "peanut_deep_gelu": ("PEANUT", dict(r=6, depth=2, act_fn="gelu", scaling=2.5), ["llama", "qwen2"], TARGETS),
    "peanut_deep_random_b": ("PEANUT", dict(r=3, depth=3, act_fn="tanh", init_weights=False), ["llama"], TARGETS),
    "peanut_one_layer": ("PEANUT", dict(r=8, depth=1, act_fn="silu", scaling=0.5, layers_to_transform=[1]),
                         ["qwen2"], TARGETS),
}, ARCHS, {"PEANUT": peft.PeanutConfig})
PAIRS = CASES.pairs
ours_config, peft_model = CASES.ours, CASES.peft_model


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES.cases))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = CASES.first_arch(case)
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    check_same_file_as_peft(peft_model(case, arch), ours, tmp_path)


def attached(case, arch, **extra):
    model = ARCHS[arch]()
    peftlab.attach(model, ours_config(case, arch, **extra))
    return model


def copy_peft_values(theirs, ours):
    """PEFT's adapter values into peftlab's layers (same keys)."""
    their_tensors = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for key, value in peftlab.core.state.adapter_tensors(ours, "default").items():
            value.copy_(their_tensors[f"base_model.model.{key}"])


@pytest.mark.parametrize("case,arch", PAIRS)
@pytest.mark.parametrize("init_weights", [True, False])
def test_same_seed_gives_peft_s_initial_adapter(case, arch, init_weights, tmp_path):
    """The same global seed before attaching gives PEFT's tensors (its construction draws, then its reset draws, in
    its order) and its logits; only init_weights=True starts as the base, bit for bit."""
    check_same_seeded_save_as_peft(lambda: peft_model(case, arch, init_weights=init_weights),
                                   lambda: attached(case, arch, init_weights=init_weights), tmp_path, seed=7)
    torch.manual_seed(7)
    theirs = peft_model(case, arch, init_weights=init_weights)
    torch.manual_seed(7)
    ours = attached(case, arch, init_weights=init_weights)
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)
    assert torch.equal(logits(ours, x), logits(ARCHS[arch](), x)) == init_weights


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_logits_gradients_and_merge_as_peft(case, arch):
    """One adapter's values in both libraries: the same logits, the same gradient of A, every encoder and decoder and
    B (the network trains through the base weight's pathway), and the same merged-and-unloaded model."""
    theirs = peft_model(case, arch)
    randomize_adapters(theirs, seed=5)
    ours = attached(case, arch)
    copy_peft_values(theirs, ours)
    check_same_logits_gradients_and_merge_as_peft(theirs, ours, batch())


@pytest.mark.parametrize("case", ["peanut", "peanut_deep_gelu", "peanut_deep_random_b"])
def test_update_is_peft_s_delta_weight_on_every_layer(case):
    """The update merging adds, s B G_0^T, is PEFT's get_delta_weight (its dense W0 -> network -> B pass), on layers
    of every orientation."""
    arch = CASES.first_arch(case)
    theirs = peft_model(case, arch)
    randomize_adapters(theirs, seed=6)
    ours = attached(case, arch)
    copy_peft_values(theirs, ours)
    modules = dict(theirs.base_model.model.named_modules())
    for name, module in adapted_modules(ours):
        weight = module.view.weight_oi().detach()
        update = module.adapters["default"].merge_into(weight.clone(), module.view) - weight
        torch.testing.assert_close(update, modules[name].get_delta_weight("default"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case,arch", [("peanut", "llama"), ("peanut_deep_gelu", "qwen2")])
def test_merged_model_matches_peft(case, arch, tmp_path):
    check_merged_model_matches_peft(peft_model(case, arch), ARCHS[arch], tmp_path)


def test_network_matches_its_written_out_recursion():
    """H_0 = σ(W0^T A^T), H_k = σ(H_{k-1} E_k^T); G_depth = H_depth, G_{k-1} = σ(G_k D_{depth+1-k}^T) + H_{k-1}."""
    g = torch.Generator().manual_seed(0)
    w, a = torch.randn(5, 7, generator=g), torch.randn(3, 5, generator=g)
    e1, e2, d1, d2 = (torch.randn(3, 3, generator=g) for _ in range(4))
    act = torch.tanh
    h0 = act(torch.einsum("oi,ro->ir", w, a))
    h1 = act(h0 @ e1.t())
    h2 = act(h1 @ e2.t())
    g1 = act(h2 @ d1.t()) + h1
    g0 = act(g1 @ d2.t()) + h0
    torch.testing.assert_close(peanut_hidden(w, a, [e1, e2], [d1, d2], act), g0)
    b = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(peanut_weight(g0, b, 0.5), 0.5 * torch.einsum("or,ir->oi", b, g0))


def test_gpt2_conv1d_is_adapted_through_its_out_in_view():
    """PEFT refuses Conv1D; here the (out, in) view adapts it: the adapter changes the model and merging gives the
    same outputs as the forward."""
    model = ARCHS["gpt2"]()
    peftlab.attach(model, peftlab.PeanutConfig(r=4, depth=1, target_modules=["c_attn", "mlp.c_proj"]))
    randomize_adapters(model, seed=2)
    x = batch()
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(ARCHS["gpt2"](), x), atol=1e-3)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)


def test_unmerge_restores_the_base_and_unmerged_adapters_each_read_w0():
    """Unmerge subtracts the update merge computed (the kept G_0), though the merged weight would give another G_0;
    two adapters active on one unmerged module each add the update of W0, as PEFT's forward does."""
    model = attached("peanut_deep_gelu", "llama")
    peftlab.attach(model, ours_config("peanut", "llama"), name="second")
    randomize_adapters(model, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batch()
    expected = logits(model, x)
    peftlab.merge(model, "default")
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-4)
    peftlab.unmerge(model, "default")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], atol=1e-7, rtol=1e-6, msg=name)
    peftlab.set_active(model, ["default", "second"])
    module = model.model.layers[0].self_attn.q_proj
    w0 = module.view.weight_oi().detach()
    both = sum(module.adapters[n].merge_into(w0.clone(), module.view) - w0 for n in ("default", "second"))
    xin = torch.randn(3, w0.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(module(xin), module.base_layer(xin) + xin @ both.t(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["peanut", "peanut_deep_gelu"])
def test_fused_path_matches_reference(case, monkeypatch):
    """The fused low-rank node (PEFTLAB_FAST=1, CUDA's default; A = G_0^T) gives the reference path's loss and
    gradients."""
    model = attached(case, "llama")
    randomize_adapters(model)
    check_fast_path_matches_reference(model, batch(), monkeypatch)


@pytest.mark.parametrize("case", sorted(CASES.cases))
def test_config_round_trip(case):
    check_config_round_trip(ours_config(case, CASES.first_arch(case)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(depth=-1), "depth must be a non-negative integer"),
    (dict(depth=1.5), "depth must be a non-negative integer"),
    (dict(depth=True), "depth must be a non-negative integer"),
    (dict(act_fn="swishy"), "act_fn must be a transformers ACT2FN name"),
    (dict(act_fn="prelu"), "act_fn='prelu' has parameters of its own"),
    (dict(scaling="big"), "scaling must be a finite number"),
    (dict(scaling=float("inf")), "scaling must be a finite number"),
    (dict(init_weights="yes"), "init_weights must be one of"),
    (dict(layers_pattern="layers"), "layers_pattern='layers' needs layers_to_transform"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.PeanutConfig(target_modules=["q_proj"], **kwargs)


def test_unknown_keys_and_bad_values_in_files_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'peanut_dropout'"):
        peftlab.config_from_dict({"peft_type": "PEANUT", "target_modules": ["q_proj"], "peanut_dropout": 0.1})
    with pytest.raises(peftlab.ConfigError, match="depth must be"):
        peftlab.config_from_dict({"peft_type": "PEANUT", "target_modules": ["q_proj"], "depth": -2})


def test_cannot_adapt_an_embedding():
    with pytest.raises(peftlab.AdapterError, match="cannot adapt 'model.embed_tokens'"):
        peftlab.attach(ARCHS["llama"](), peftlab.PeanutConfig(r=4, target_modules=["q_proj", "embed_tokens"]))


def test_layers_keep_peft_s_parameter_names_and_roles():
    model = attached("peanut_deep_gelu", "llama")
    layer = next(layer for _, _, layer in adapter_layers(model))
    assert set(layer.state_tensors()) == {"peanut_A.weight", "peanut_B.weight", "peanut_encoders.0.weight",
                                          "peanut_encoders.1.weight", "peanut_decoders.0.weight",
                                          "peanut_decoders.1.weight"}
    assert {n for n, role in layer.param_roles().items() if role == "B"} == {"peanut_B.weight"}
