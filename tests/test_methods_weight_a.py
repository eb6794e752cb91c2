"""Method-specific behaviour of IA3, VeRA, LoHa, LoKr and Tied-LoRA, and the shared-tensor core hook."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.core.inject import adapter_layers, model_state
from models import ARCHS, batch, randomize_adapters

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def layers_of(model, name="default"):
    return {mname: layer for mname, n, layer in adapter_layers(model) if n == name}


def attached(config, arch="llama", seed=1):
    model = ARCHS[arch]()
    peftlab.attach(model, config)
    randomize_adapters(model, seed=seed)
    return model


# -- merge exactness: delta_weight against an einsum reference built from the raw factors ---------
def loha_reference(layer):
    w1 = torch.einsum("or,ri->oi", layer.hada_w1_a, layer.hada_w1_b)
    w2 = torch.einsum("or,ri->oi", layer.hada_w2_a, layer.hada_w2_b)
    return w1 * w2 * layer.scaling


def lokr_reference(layer):
    def factor(name):
        if hasattr(layer, name):
            return getattr(layer, name)
        return torch.einsum("ar,rc->ac", getattr(layer, name + "_a"), getattr(layer, name + "_b"))

    w1, w2 = factor("lokr_w1"), factor("lokr_w2")
    kron = torch.einsum("ac,bd->abcd", w1, w2)  # (W1 ⊗ W2)[a*B + b, c*D + d] = W1[a, c] W2[b, d]
    return kron.reshape(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) * layer.scaling


def vera_reference(layer):
    a = layer.shared.vera_A[:, : layer.in_features]
    b = layer.shared.vera_B[: layer.out_features]
    return torch.einsum("o,or,r,ri->oi", layer.vera_lambda_b, b, layer.vera_lambda_d, a)


def tied_reference(layer):
    return torch.einsum("o,or,r,ri->oi", layer.tied_lora_v, layer.B, layer.tied_lora_u, layer.A) * layer.scaling


MERGE_CASES = {
    "loha": (lambda: peftlab.LoHaConfig(r=3, alpha=5, target_modules=LLAMA_TARGETS), loha_reference),
    "lokr": (lambda: peftlab.LoKrConfig(r=4, alpha=3, target_modules=LLAMA_TARGETS), lokr_reference),
    "lokr_decomposed": (lambda: peftlab.LoKrConfig(r=1, alpha=3, decompose_both=True, decompose_factor=4,
                                                   target_modules=LLAMA_TARGETS), lokr_reference),
    "vera": (lambda: peftlab.VeraConfig(r=16, target_modules=LLAMA_TARGETS), vera_reference),
    "tied_lora": (lambda: peftlab.TiedLoraConfig(r=4, lora_alpha=6, target_modules=LLAMA_TARGETS), tied_reference),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_delta_weight_and_merge_match_einsum_reference(case):
    make_config, reference = MERGE_CASES[case]
    model = attached(make_config())
    base = ARCHS["llama"]()
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        refs = {m: reference(layer) for m, layer in layers_of(model).items()}
        for mname, layer in layers_of(model).items():
            ref = refs[mname]
            assert ref.abs().max() > 1e-3, "randomized adapter should not be zero"
            torch.testing.assert_close(layer.delta_weight(), ref, atol=1e-6, rtol=1e-5)
            xin = x[..., : layer.in_features]
            torch.testing.assert_close(layer.delta(xin), xin @ ref.t(), atol=1e-5, rtol=1e-5)
        peftlab.merge(model)
        for mname, ref in refs.items():
            merged = model.get_submodule(mname).base_layer.weight
            torch.testing.assert_close(merged, base.get_submodule(mname).weight + ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("config", [peftlab.LoHaConfig(r=4, target_modules=["c_attn", "c_fc"]),
                                    peftlab.LoKrConfig(r=2, target_modules=["c_attn", "c_fc"])])
def test_lycoris_on_gpt2_conv1d_merges_to_the_same_output(config):
    model = attached(config, "gpt2")  # PEFT refuses Conv1D here; we adapt it through BaseView's (out, in) view
    x = batch()
    with torch.no_grad():
        expected = model(x).logits
        assert not torch.allclose(expected, ARCHS["gpt2"]()(x).logits, atol=1e-3)
        merged = peftlab.merge_and_unload(model)
        torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)


# -- IA3 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,targets,feedforward", [
    ("gpt2", ["c_attn", "attn.c_proj", "mlp.c_proj"], ["mlp.c_proj"]),
    ("neox", ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
])
def test_ia3_merge_scales_weight_and_bias_and_unmerge_restores(arch, targets, feedforward):
    base = ARCHS[arch]()
    with torch.no_grad():  # transformers initialises biases to 0, which would hide a missing bias scaling
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model = copy.deepcopy(base)
    peftlab.attach(model, peftlab.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    randomize_adapters(model)
    x = batch()
    with torch.no_grad():
        expected = model(x).logits
        peftlab.merge(model)
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
        changed_bias = [n for n, m in layers_of(model).items() if not torch.equal(
            model.get_submodule(n).base_layer.bias, base.get_submodule(n).bias)]
        assert changed_bias and all(not m.transforms_input for n, m in layers_of(model).items() if n in changed_bias)
        peftlab.unmerge(model)
        for name in layers_of(model):
            torch.testing.assert_close(model.get_submodule(name).base_layer.weight, base.get_submodule(name).weight)
            torch.testing.assert_close(model.get_submodule(name).base_layer.bias, base.get_submodule(name).bias)


def test_ia3_scales_input_of_feedforward_and_output_of_other_targets():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    layers = layers_of(model)
    down, v = layers["model.layers.0.mlp.down_proj"], layers["model.layers.0.self_attn.v_proj"]
    assert down.ia3_l.shape == (1, 48) and down.transforms_input
    assert v.ia3_l.shape == (16, 1) and not v.transforms_input
    with torch.no_grad():
        down.ia3_l.copy_(torch.linspace(0.5, 1.5, 48)[None])
        v.ia3_l.copy_(torch.linspace(-1, 2, 16)[:, None])
    h = torch.randn(2, 48)
    mlp = model.get_submodule("model.layers.0.mlp.down_proj")
    torch.testing.assert_close(mlp(h), mlp.base_layer(h * down.ia3_l))
    h = torch.randn(2, 32)
    attn = model.get_submodule("model.layers.0.self_attn.v_proj")
    torch.testing.assert_close(attn(h), attn.base_layer(h) * v.ia3_l.t())


def test_ia3_unmerge_with_a_zero_scale_is_refused():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.IA3Config(target_modules=["q_proj"]))
    with torch.no_grad():
        next(iter(layers_of(model).values())).ia3_l[3] = 0.0
    peftlab.merge(model)
    with pytest.raises(peftlab.AdapterError, match="scale is exactly 0"):
        peftlab.unmerge(model)


def test_ia3_has_no_additive_delta_weight():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.IA3Config(target_modules=["q_proj"]))
    with pytest.raises(peftlab.AdapterError, match="no additive delta_weight"):
        next(iter(layers_of(model).values())).delta_weight()


# -- VeRA --------------------------------------------------------------------------------------
def test_vera_projections_are_shared_frozen_and_regenerated_from_the_key(tmp_path):
    config = peftlab.VeraConfig(r=8, projection_prng_key=11, save_projection=False, target_modules=LLAMA_TARGETS)
    model = attached(config)
    layers = list(layers_of(model).values())
    shared = model_state(model).shared["default"]
    assert all(layer.shared is shared for layer in layers)
    assert shared.vera_A.shape == (8, 48) and shared.vera_B.shape == (32, 8)  # largest in / out over targets
    assert not any(p is shared.vera_A for p in model.parameters())
    peftlab.save_adapter(model, tmp_path)
    assert not any("vera_A" in k or "vera_B" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = ARCHS["llama"]()
    peftlab.load_adapter(fresh, tmp_path)
    assert torch.equal(model_state(fresh).shared["default"].vera_A, shared.vera_A)
    x = batch()
    assert torch.equal(fresh(x).logits, model(x).logits)
    other = ARCHS["llama"]()
    peftlab.load_adapter(other, tmp_path, projection_prng_key=12)
    assert not torch.allclose(model_state(other).shared["default"].vera_A, shared.vera_A)


def test_vera_adapters_keep_their_own_projections_and_delete_removes_them():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.VeraConfig(r=8, projection_prng_key=1, target_modules=["q_proj"]))
    peftlab.attach(model, peftlab.VeraConfig(r=4, projection_prng_key=2, target_modules=["q_proj", "down_proj"]),
                   name="second")
    state = model_state(model)
    assert state.shared["default"].vera_A.shape == (8, 32) and state.shared["second"].vera_A.shape == (4, 48)
    peftlab.delete_adapter(model, "second")
    assert set(state.shared) == {"default"}


# -- LoHa / LoKr dropouts ----------------------------------------------------------------------
def test_module_dropout_skips_the_whole_update_only_in_training():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.LoKrConfig(r=4, module_dropout=0.5, target_modules=["q_proj"]))
    randomize_adapters(model)
    module = model.get_submodule("model.layers.0.self_attn.q_proj")
    h = torch.randn(2, 32)
    base_out = module.base_layer(h)
    torch.manual_seed(0)
    module.train()
    skipped = [torch.equal(module(h), base_out) for _ in range(40)]
    assert 5 < sum(skipped) < 35
    module.eval()
    assert not any(torch.equal(module(h), base_out) for _ in range(5))


@pytest.mark.parametrize("config,rescaled", [
    (peftlab.LoHaConfig(r=4, rank_dropout=0.5, target_modules=["q_proj"]), True),
    (peftlab.LoKrConfig(r=4, rank_dropout=0.5, target_modules=["q_proj"]), False),
    (peftlab.LoKrConfig(r=4, rank_dropout=0.5, rank_dropout_scale=True, target_modules=["q_proj"]), True),
])
def test_rank_dropout_zeroes_output_rows_and_rescales_as_peft(config, rescaled):
    model = attached(config)
    layer = layers_of(model)["model.layers.0.self_attn.q_proj"]
    h = torch.randn(5, 32)
    layer.eval()
    full = layer.delta(h)
    layer.train()
    torch.manual_seed(0)
    dropped = layer.delta(h)
    kept = (dropped != 0).all(0)
    assert 0 < kept.sum() < 32 and (dropped[:, ~kept] == 0).all()
    factor = 32 / kept.sum() if rescaled else 1.0
    torch.testing.assert_close(dropped[:, kept], full[:, kept] * factor)


# -- Tied-LoRA ---------------------------------------------------------------------------------
def test_tied_lora_shares_one_pair_per_shape_and_counts_it_once(tmp_path):
    model = ARCHS["llama"]()
    _, total_before = peftlab.count_parameters(model)
    peftlab.attach(model, peftlab.TiedLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    layers = layers_of(model)
    q = [layers[f"model.layers.{i}.self_attn.q_proj"] for i in range(2)]
    assert q[0].A is q[1].A and q[0].B is q[1].B and q[0].tied_lora_u is not q[1].tied_lora_u
    v = layers["model.layers.0.self_attn.v_proj"]  # 32 -> 16, k_proj has the same shape
    assert v.A is layers["model.layers.1.self_attn.k_proj"].A and v.B is not q[0].B
    shapes = {"32x32": (32, 32), "16x32": (16, 32), "32x48": (32, 48)}
    pairs = sum(4 * (i + o) for o, i in shapes.values())
    vectors = sum(4 + layer.out_features for layer in layers.values())
    trainable, total = peftlab.count_parameters(model)
    assert trainable == pairs + vectors and total == total_before + trainable
    peftlab.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k for k in keys if not k.startswith("base_model.model.")} == {
        f"base_model.tied_lora_{m}.{s}" for m in "AB" for s in shapes}
    assert len(keys) == 2 * len(shapes) + 2 * len(layers)


class TwoBranches(nn.Module):
    """y = f(x) + g(x): the loss is linear in each branch's update, so shared gradients add exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f, self.g = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x):
        return self.f(x) + self.g(x)


def test_tied_lora_gradients_accumulate_over_all_layers():
    model = TwoBranches()
    peftlab.attach(model, peftlab.TiedLoraConfig(r=3, target_modules=["f", "g"], init_weights=False))
    randomize_adapters(model, seed=2)
    x, w = torch.randn(4, 8), torch.randn(4, 6)
    layers = layers_of(model)
    shared_a = layers["f"].A

    def grad_with(active):
        for name in ("f", "g"):
            model.get_submodule(name).active = ["default"] if name in active else []
        shared_a.grad = None
        (model(x) * w).sum().backward()
        return shared_a.grad.clone()

    both, only_f, only_g = grad_with({"f", "g"}), grad_with({"f"}), grad_with({"g"})
    assert only_f.abs().sum() > 0 and only_g.abs().sum() > 0
    torch.testing.assert_close(both, only_f + only_g)


def test_tied_lora_is_identity_at_init_and_every_part_trains():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.TiedLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    x = batch()
    with peftlab.disabled(model):
        ref = model(x).logits
    torch.testing.assert_close(model(x).logits, ref)
    layer = layers_of(model)["model.layers.0.self_attn.q_proj"]
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # step 1 moves v away from 0; from then on A, B and u get gradients too
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert {name for name, p in layer.named_parameters() if not torch.equal(p, before[name])} == set(before)


VARIANTS = [(["A", "B"], ["A", "B", "u", "v"]), (["A", "B"], ["u", "v"]), (["A"], ["A", "B", "u", "v"]),
            ([], ["u", "v"]), (["B"], ["A", "u"]), (["A", "B"], ["A", "B"]), (["A", "B"], ["A"])]


@pytest.mark.parametrize("tied,trainable", VARIANTS)
def test_tied_lora_variants_select_what_is_shared_and_what_trains(tied, trainable, tmp_path):
    config = peftlab.TiedLoraConfig(r=4, target_modules=["q_proj", "v_proj"], tied_matrices=tied, trainable=trainable)
    model = ARCHS["llama"]()
    peftlab.attach(model, config)
    x = batch()
    with peftlab.disabled(model):
        ref = model(x).logits
    torch.testing.assert_close(model(x).logits, ref)  # identity at init for every selection
    layers = layers_of(model)
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    for m in "AB":
        assert (getattr(q0, m) is getattr(q1, m)) == (m in tied)
    expected = {m for m in "ABuv" if m in trainable}
    names = {"A": lambda l: l.A, "B": lambda l: l.B, "u": lambda l: l.tied_lora_u, "v": lambda l: l.tied_lora_v}
    assert {m for m, get in names.items() if get(q0).requires_grad} == expected
    peftlab.set_active(model, None)
    peftlab.set_active(model, "default")  # re-activation must not unfreeze the frozen ones
    assert {m for m, get in names.items() if get(q0).requires_grad} == expected
    # trainable count from the selection: tied matrices once per shape, untied once per layer
    shapes = {(l.out_features, l.in_features) for l in layers.values()}
    sizes = {"A": lambda o, i: 4 * i, "B": lambda o, i: 4 * o, "u": lambda o, i: 4, "v": lambda o, i: o}
    count = sum(sizes[m](o, i) for m in expected & {"A", "B"} & set(tied) for o, i in shapes)
    count += sum(sizes[m](l.out_features, l.in_features) for m in expected - set(tied) for l in layers.values())
    assert peftlab.count_parameters(model)[0] == count
    before = {m: get(q0).detach().clone() for m, get in names.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert {m for m, get in names.items() if not torch.equal(get(q0), before[m])} == expected
    torch.testing.assert_close(q0.delta_weight(), tied_reference(q0))
    peftlab.save_adapter(model, tmp_path)
    again = ARCHS["llama"]()
    peftlab.load_adapter(again, tmp_path)
    assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.parametrize("bad", [{"tied_matrices": ["C"]}, {"trainable": []}, {"trainable": ["u", "u"]},
                                 {"tied_matrices": "AB"}])
def test_tied_lora_bad_selection_is_a_clear_error(bad):
    with pytest.raises(peftlab.ConfigError, match="tied_matrices|trainable"):
        peftlab.TiedLoraConfig(r=4, target_modules=["q_proj"], **bad)
