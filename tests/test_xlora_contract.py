"""The contract suite's checks (tests/test_contract.py) for X-LoRA, which ``peftlab.variants()`` cannot list: its
config names LoRA expert folders, so the experts are written here first. Only the classifier trains; the loss falls,
save -> load is bit-exact, disabling gives the base, merging is refused, a second adapter coexists, and training under
activation checkpointing (peftlab's and transformers') gives the gradients it gives without."""
import pytest
import torch

import peftlab
from contract_checks import check_save_load_bit_exact, check_trains_under_bf16_autocast
from models import batch, randomize_adapters, tiny_llama
from peftlab.core.hooks import step_end
from peftlab.core.inject import model_state
from peftlab.core.registry import method_for
from peftlab.core.state import adapter_tensors
from peftlab.methods.xlora import XLoraConfig
from peftlab.train import recompute
from test_activations import _loss_and_grads

EXPERT_TARGETS = (["q_proj", "v_proj"], ["v_proj", "down_proj"])


def fit(model, x, steps, lr=1e-2):
    """``steps`` AdamW steps on the language-model loss of ``x``; the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_end(model, step)
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two LoRA experts of the tiny Llama, each trained a little on its own batch (``batch(seed=i)``, the "domain"
    of expert i), saved by peftlab: {"0": folder, "1": folder}."""
    out = {}
    for i, targets in enumerate(EXPERT_TARGETS):
        model = tiny_llama()
        peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        fit(model, batch(seed=i, b=4, t=16), steps=30)
        out[str(i)] = str(peftlab.save_adapter(model, tmp_path_factory.mktemp(f"expert{i}")))
    return out


def xlora_config(experts, **settings):
    return XLoraConfig(hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=16, **settings)


def make(experts, **settings):
    model = tiny_llama(0)
    config = xlora_config(experts, **settings)
    peftlab.attach(model, config)
    return model, config


def expert_weights(model):
    return [t.clone() for layer in model.peftlab_hooked["default"].experts for _, a, b, _, _ in layer for t in (a, b)]


def test_only_the_classifier_trains_and_the_loss_falls(experts):
    """Trained on expert 0's domain, the classifier learns to weigh expert 0 up: the loss falls (as the contract's, by
    0.05 in 20 steps at 1e-2 x lr_scale) and the experts stay as read."""
    model, config = make(experts)
    frozen = expert_weights(model)
    x = batch(seed=0, b=4, t=16)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(t) for t in adapter_tensors(model, "default").values()}
    model(x)
    before = model.peftlab_hooked["default"].scalings[..., 0].mean()
    losses = fit(model, x, steps=20, lr=1e-2 * method_for(config).rate(config))
    assert losses[-1] < losses[0] - 0.05, f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    model(x)
    assert model.peftlab_hooked["default"].scalings[..., 0].mean() > before
    assert all(torch.equal(a, b) for a, b in zip(expert_weights(model), frozen)), "the experts stay frozen"


def test_save_load_bit_exact(experts, tmp_path):
    model, _ = make(experts)
    randomize_adapters(model)
    check_save_load_bit_exact(model, tmp_path, tiny_llama(0), adapter_tensors)


def test_disable_and_set_active_none(experts):
    model, _ = make(experts)
    x = batch()
    ref = tiny_llama(0)(x).logits
    assert not torch.allclose(model(x).logits, ref, atol=1e-3), "the experts should change the output"
    with peftlab.disabled(model):
        torch.testing.assert_close(model(x).logits, ref)
    peftlab.set_active(model, None)
    torch.testing.assert_close(model(x).logits, ref)


def test_merge_is_refused_and_leaves_the_model_as_it_was(experts):
    model, _ = make(experts)
    x = batch()
    ref = model(x).logits
    for call in (peftlab.merge, peftlab.unmerge, peftlab.merge_and_unload):
        with pytest.raises(peftlab.AdapterError, match="XLORA.*not mergeable"):
            call(model)
    assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("xlora_first", [True, False])
def test_coexists_with_another_method(experts, xlora_first):
    """A LoRA adapter beside X-LoRA, attached after it or before it (then X-LoRA's expert hooks sit on LoRA's
    wrapper of v_proj): attaching one leaves the other's output alone, and each active one gives what it gives alone."""
    def add(model, method):
        torch.manual_seed(5)  # the same classifier init as alone
        config = xlora_config(experts) if method == "xlora" else peftlab.variants()["lora"](["v_proj", "o_proj"], 2)
        peftlab.attach(model, config, name=method)
        randomize_adapters(model, seed=2)

    x = batch()
    alone = {}
    for method in ("xlora", "lora"):
        add(model := tiny_llama(0), method)
        alone[method] = model(x).logits
    first, second = ("xlora", "lora") if xlora_first else ("lora", "xlora")
    model = tiny_llama(0)
    add(model, first)
    peftlab.attach(model, peftlab.variants()["lora"](["q_proj"], 2), name="inactive", activate=False)
    torch.testing.assert_close(model(x).logits, alone[first])
    add(model, second)
    for method in (first, second, first):
        peftlab.set_active(model, method)
        torch.testing.assert_close(model(x).logits, alone[method], msg=method)
    assert set(model_state(model).configs) == {"xlora", "lora", "inactive"}


@pytest.mark.parametrize("mode", ["on", "offload", "transformers"])
def test_gradients_equal_under_activation_checkpointing(experts, mode):
    """The layers' hooks read the call's scalings again in the recompute: the same loss and classifier gradients as
    without checkpointing (classifier dropout on)."""
    model, _ = make(experts, xlora_dropout_p=0.3)
    assert not recompute.enabled_for(model), "capability reads_outer_graph: torch's checkpoint, not the lean node"
    model.train()
    ids = batch(b=2, t=7)
    ref_loss, ref = _loss_and_grads(model, ids, "off")
    assert ref and all(g.abs().sum() > 0 for g in ref.values())
    if mode == "transformers":
        model.gradient_checkpointing_enable()  # non-reentrant, transformers' default
        loss, grads = _loss_and_grads(model, ids, "off")
        assert model.model.layers[0].gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        with pytest.raises(peftlab.AdapterError, match="use_reentrant=False"):
            model(input_ids=ids, labels=ids, use_cache=False)
    else:
        loss, grads = _loss_and_grads(model, ids, mode)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_trains_under_bf16_autocast(experts):
    check_trains_under_bf16_autocast(make(experts)[0], "xlora")
