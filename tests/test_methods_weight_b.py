"""AdaLoRA's rank schedule and OFT / BOFT / HRA rotations: orthogonality, merge against dense einsum
references, the activation path against the merged weight, and the options that only act in training."""
import json

import pytest
import torch

import peftlab
from peftlab.core.hooks import extra_loss, step_end
from peftlab.core.inject import adapter_layers, model_state
from peftlab.ops.orthogonal import cayley, cayley_neumann, skew_from_upper
from models import batch, randomize_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=3, tfinal=4, total_step=20, deltaT=3, lora_alpha=8,
                target_modules=TARGETS)


def layers(model, name="default"):
    return [layer for _, _, layer in adapter_layers(model, name)]


def expected_budget(step, n, init_r=4, target_r=2, tinit=3, tfinal=4, total_step=20):
    progress = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_r - target_r) * n * progress**3 + target_r * n)


def train_adalora(model, steps, step_end_before_zero_grad=False, record=None):
    model.train()
    x = batch(b=2, t=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, steps + 1):  # our trainer's steps are 1-based
        model(x, labels=x).loss.backward()
        opt.step()
        if step_end_before_zero_grad:
            step_end(model, step)
        opt.zero_grad(set_to_none=True)
        if not step_end_before_zero_grad:
            step_end(model, step)
        if record is not None:
            record.append(model_state(model).configs["default"].rank_pattern)
    model.eval()


def kept(pattern):
    return sum(sum(mask) for mask in pattern.values())


def test_adalora_budget_falls_on_schedule_and_masks_every_delta_t():
    model = peftlab.attach(tiny_llama(), peftlab.AdaLoraConfig(**SCHEDULE))
    n = len(layers(model))
    patterns = []
    train_adalora(model, 22, record=patterns)
    budgets = []
    for step, pattern in enumerate(patterns, start=1):
        previous = patterns[step - 2] if step > 1 else None
        if step <= 3:  # warm-up: nothing masked yet
            assert pattern is None, step
        elif step < 16:  # budgeting phase: a new mask exactly every deltaT steps
            if step % 3 == 0:
                assert pattern is not previous and kept(pattern) == expected_budget(step, n), step
                budgets.append(kept(pattern))
            else:
                assert pattern is previous, step
        elif step == 16:  # total_step - tfinal: the final mask, target_r per layer on average
            assert kept(pattern) == 2 * n
        else:
            assert pattern is previous, step
    assert budgets == sorted(budgets, reverse=True) and budgets[0] < 4 * n
    for layer in layers(model):  # the final mask is re-applied after every later step
        assert torch.all(layer.lora_E[~layer.keep] == 0) and layer.keep.sum() == sum(layer.rank_pattern())


def test_adalora_saves_the_pruned_ranks_and_reloads_them(tmp_path):
    model = peftlab.attach(tiny_llama(), peftlab.AdaLoraConfig(**SCHEDULE))
    train_adalora(model, 17)
    pattern = model_state(model).configs["default"].rank_pattern
    x = batch(seed=5)
    with torch.no_grad():
        expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == pattern
    fresh = tiny_llama()
    peftlab.load_adapter(fresh, tmp_path)
    ranks = {layer.pattern_key: layer.r for layer in layers(fresh)}
    assert ranks == {key: sum(mask) for key, mask in pattern.items()}
    assert sum(ranks.values()) == 2 * len(ranks) < 4 * len(ranks)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_adalora_allocation_is_the_same_whether_step_end_comes_before_or_after_zero_grad():
    before, after = (peftlab.attach(tiny_llama(), peftlab.AdaLoraConfig(**SCHEDULE)) for _ in range(2))
    train_adalora(before, 12, step_end_before_zero_grad=True)
    train_adalora(after, 12)
    assert model_state(before).configs["default"].rank_pattern == model_state(after).configs["default"].rank_pattern
    for a, b in zip(layers(before), layers(after)):
        assert torch.equal(a.lora_E, b.lora_E)


def test_adalora_batched_orthogonality_loss_equals_the_per_layer_sum():
    """extra_loss_of (groups of equal shapes, one batched product each) == the regulariser written out layer by
    layer, value and gradients, on layers of four shapes (all linear layers of the tiny Llama)."""
    config = peftlab.AdaLoraConfig(**{**SCHEDULE, "target_modules": "all-linear"}, orth_reg_weight=0.3)
    model = peftlab.attach(tiny_llama(), config)
    randomize_adapters(model, std=0.3)
    model.train()
    ours = layers(model)
    assert len({(tuple(l.lora_A.shape), tuple(l.lora_B.shape)) for l in ours}) >= 3
    batched = type(ours[0]).extra_loss_of(ours)
    grads = torch.autograd.grad(batched, [l.lora_A for l in ours] + [l.lora_B for l in ours])
    eye = torch.eye(4)
    per_layer = 0.3 / (2 * len(ours)) * sum(
        torch.linalg.norm(l.lora_A @ l.lora_A.T - eye) + torch.linalg.norm(l.lora_B.T @ l.lora_B - eye) for l in ours)
    want = torch.autograd.grad(per_layer, [l.lora_A for l in ours] + [l.lora_B for l in ours])
    torch.testing.assert_close(batched, per_layer, rtol=1e-6, atol=1e-7)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_adalora_step_end_misuse_names_the_problem():
    model = peftlab.attach(tiny_llama(), peftlab.AdaLoraConfig(**SCHEDULE))
    with pytest.raises(peftlab.AdapterError, match="no gradient for lora_A at step_end"):
        step_end(model, 1)
    with pytest.raises(peftlab.AdapterError, match="step 17 needs the final rank allocation"):
        step_end(model, 17)  # jumping to the end: nothing to rank the triplets by


def test_adalora_orthogonality_loss_only_while_training():
    model = peftlab.attach(tiny_llama(), peftlab.AdaLoraConfig(orth_reg_weight=0.7, **SCHEDULE))
    randomize_adapters(model, std=0.3)
    x = batch()
    ours = layers(model)
    eye = torch.eye(4)
    reference = 0.7 / (2 * len(ours)) * sum(
        torch.linalg.norm(layer.lora_A @ layer.lora_A.T - eye) + torch.linalg.norm(layer.lora_B.T @ layer.lora_B - eye)
        for layer in ours)
    model.eval()
    assert extra_loss(model) is None
    plain = model(x, labels=x).loss
    model.train()
    torch.testing.assert_close(extra_loss(model), reference)
    torch.testing.assert_close(model(x, labels=x).loss, plain + reference)


# -- rotations -----------------------------------------------------------------------------------
def attach_random(config, seed=0):
    model = peftlab.attach(tiny_llama(seed), config)
    randomize_adapters(model, seed=seed + 1, std=0.3)
    return model


def assert_orthogonal(mats, atol=1e-5):
    eye = torch.eye(mats.shape[-1]).expand_as(mats)
    torch.testing.assert_close(mats.transpose(-2, -1) @ mats, eye, atol=atol, rtol=0)


def dense_blockdiag(blocks):
    n, b, _ = blocks.shape
    out = torch.zeros(n, b, n, b)
    out[torch.arange(n), :, torch.arange(n), :] = blocks
    return out.reshape(n * b, n * b)


def permutation_matrix(perm):
    return torch.eye(len(perm))[perm]  # row i has its 1 at column perm[i]


def oft_reference(layer):
    with torch.no_grad():
        return dense_blockdiag(layer.blocks())


def boft_reference(layer):
    """M = M_{N-1} ... M_0, M_i = P_i blockdiag_i P_i^T, with dense permutation matrices."""
    with torch.no_grad():
        rotation = torch.eye(layer.perms.shape[1])
        for i, blocks in enumerate(layer.blocks()):
            p = permutation_matrix(layer.perms[i])
            rotation = torch.einsum("ij,jk,lk,lm->im", p, dense_blockdiag(blocks), p, rotation)
        return rotation


def hra_reference(layer):
    """H^T for H = prod_i (I - 2 u_i u_i^T / |u_i|^2), left to right: W' = W H = W (H^T)^T."""
    with torch.no_grad():
        units = layer.hra_u / layer.hra_u.norm(dim=0)
        h = torch.eye(units.shape[0])
        for i in range(units.shape[1]):
            h = h - 2 * torch.einsum("ij,j,k->ik", h, units[:, i], units[:, i])
        return h.T


# each reference gives the R of the activation path x -> x R, so that the merged weight is W R^T
ROTATIONS = {
    "oft_exact": (peftlab.OFTConfig(target_modules=TARGETS, oft_block_size=8, use_cayley_neumann=False), oft_reference),
    "oft_shared": (peftlab.OFTConfig(target_modules=TARGETS, oft_block_size=16, block_share=True,
                                     use_cayley_neumann=False), oft_reference),
    "boft_butterfly": (peftlab.BOFTConfig(target_modules=TARGETS, boft_block_size=4, boft_n_butterfly_factor=3),
                       boft_reference),
    "hra": (peftlab.HRAConfig(target_modules=TARGETS, r=4), hra_reference),
}


@pytest.mark.parametrize("case", sorted(ROTATIONS))
def test_rotation_is_orthogonal_and_merge_matches_the_einsum_reference(case):
    config, reference = ROTATIONS[case]
    model = attach_random(config)
    x = batch()
    with torch.no_grad():
        before = model(x).logits
    originals, expected = {}, {}
    for name, _, layer in adapter_layers(model):
        rotation = reference(layer)
        assert_orthogonal(rotation)
        module = model.get_submodule(name)
        w = module.base_layer.weight.detach().clone()
        originals[name] = w
        scale = layer.boft_s.detach() if hasattr(layer, "boft_s") else 1.0
        expected[name] = scale * torch.einsum("oi,ji->oj", w, rotation)  # W' = diag(s) W R^T
        xs = torch.randn(3, w.shape[1])
        with torch.no_grad():  # the activation path is x @ R
            torch.testing.assert_close(layer.transform_input(xs), xs @ rotation, atol=1e-5, rtol=1e-5)
    peftlab.merge(model)
    for name, w in expected.items():
        torch.testing.assert_close(model.get_submodule(name).base_layer.weight, w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-5)
    peftlab.unmerge(model)
    for name, w in originals.items():
        torch.testing.assert_close(model.get_submodule(name).base_layer.weight, w, atol=1e-5, rtol=1e-5)


def test_every_boft_block_and_hra_gram_schmidt_are_orthogonal():
    boft = attach_random(peftlab.BOFTConfig(target_modules=TARGETS, boft_block_size=8, boft_n_butterfly_factor=2))
    for layer in layers(boft):
        with torch.no_grad():
            assert_orthogonal(layer.blocks().flatten(0, 1))
    hra = attach_random(peftlab.HRAConfig(target_modules=TARGETS, r=5, apply_GS=True, init_weights=False))
    for layer in layers(hra):
        with torch.no_grad():
            assert_orthogonal(layer.merge_into(torch.eye(layer.hra_u.shape[0]), None))


def test_peft_neumann_series_approximates_the_inverse_of_its_exact_cayley_map():
    skew = skew_from_upper(torch.randn(3, 6) * 0.05, 4)
    exact = cayley(skew)
    assert_orthogonal(exact)
    torch.testing.assert_close(cayley_neumann(skew, 12), torch.linalg.inv(exact), atol=1e-6, rtol=0)
    assert not torch.allclose(cayley_neumann(skew, 12), exact, atol=1e-3)


def test_coft_keeps_each_generator_within_eps():
    model = attach_random(peftlab.OFTConfig(target_modules=TARGETS, oft_block_size=8, coft=True, eps=0.2))
    for layer in layers(model):
        layer.blocks()
        norms = skew_from_upper(layer.oft_R, 8).norm(dim=(1, 2))
        assert torch.all(norms <= 0.2 / layer.r**0.5 + 1e-6)


@pytest.mark.parametrize("config,blocks", [
    (peftlab.OFTConfig(target_modules=["q_proj"], oft_block_size=4, module_dropout=0.5), lambda layer: layer.blocks()),
    (peftlab.BOFTConfig(target_modules=["q_proj"], boft_block_size=4, boft_dropout=0.5),
     lambda layer: layer.blocks()[0]),
])
def test_block_dropout_sets_blocks_to_identity_only_in_training(config, blocks):
    model = attach_random(config)
    layer = layers(model)[0]
    identity = torch.eye(4)
    x = batch()
    with torch.no_grad():
        model.eval()
        expected = model(x).logits
        assert not any(torch.allclose(b, identity) for b in blocks(layer))
        model.train()
        assert sum(torch.allclose(b, identity) for b in blocks(layer)) == 4  # int(0.5 * 8 blocks)
        peftlab.merge(model)  # merging while in training mode folds in the rotation without dropout
        model.eval()
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_hra_pairs_reflections_for_identity_and_says_when_it_cannot():
    layer = layers(peftlab.attach(tiny_llama(), peftlab.HRAConfig(target_modules=["q_proj"], r=4)))[0]
    assert layer.identity_at_init and torch.equal(layer.hra_u[:, 0], layer.hra_u[:, 1])
    with pytest.warns(UserWarning, match="r=3 is odd"):
        odd = layers(peftlab.attach(tiny_llama(), peftlab.HRAConfig(target_modules=["q_proj"], r=3)))[0]
    assert not odd.identity_at_init
    with pytest.raises(peftlab.ConfigError, match="apply_GS needs r <= in_features"):
        peftlab.attach(tiny_llama(), peftlab.HRAConfig(target_modules=["q_proj"], r=33, apply_GS=True))


def test_oft_block_size_that_does_not_divide_is_adjusted_like_peft():
    with pytest.warns(UserWarning, match="oft_block_size=5 does not divide in_features=32; using 4"):
        model = peftlab.attach(tiny_llama(), peftlab.OFTConfig(target_modules=["q_proj"], oft_block_size=5))
    assert {(layer.r, layer.block_size) for layer in layers(model)} == {(8, 4)}


def test_adalora_target_above_init_warns_and_keeps_every_rank():
    import warnings as _w

    from peftlab.methods.adalora import AdaLoraConfig

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        AdaLoraConfig(target_modules=["q_proj"], init_r=2, target_r=4, total_step=10)
    assert any("exceeds init_r" in str(w.message) for w in caught)
