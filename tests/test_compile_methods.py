"""Every registered method under compiled decoder layers (``compile_scope="layers"``, what ``peftlab train``
does by default on CUDA): one training step's loss and every trainable parameter's gradient equal eager's.
The backend is ``aot_eager`` (dynamo's capture and AOT autograd's joint graph, no C compiler), which is where a
method's forward either traces correctly or not; inductor only changes the kernels.
"""
import copy

import pytest
import torch

import peftlab
from models import batch, randomize_adapters, tiny_llama
from peftlab.core.config import ConfigError
from peftlab.train.packing import compile_model, layers_compile

VARIANTS = sorted(peftlab.variants())


def _step(model, x):
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _adapted(variant, layers=None):
    torch._dynamo.reset()
    model = tiny_llama()
    model.config.use_cache = False
    config = peftlab.variants()[variant](["q_proj", "v_proj", "down_proj"], 4)
    if layers is not None:
        config.layers_to_transform = layers
        try:
            peftlab.attach(model, config)
        except ConfigError as error:  # LLaMA-Adapter picks its (top) layers itself: its all-layers case is this one
            pytest.skip(f"{variant} takes no layers_to_transform ({error})")
    else:
        peftlab.attach(model, config)
    randomize_adapters(model)
    return model


def test_every_variant_runs_in_compiled_layers():
    """No variant trains eagerly any more (LLaMA-Adapter did until compile_model turned on dynamo's hook guards); a
    variant that needs to would set ``compiles_in_layers = False`` and be listed here."""
    assert [v for v in VARIANTS if not layers_compile(_adapted(v))] == []


@pytest.mark.parametrize("variant", ["adaption_prompt", "bottleneck"])
def test_the_hooked_layer_cases_are_not_the_base_model(variant):
    """The cases that caught dynamo's skipped hook guards (below: LLaMA-Adapter on the top layer, bottleneck adapters
    on layer 1 of 2 ran layer 0's hook-free graph, so the compiled loss was the base model's and nothing trained):
    their eager loss must differ from the base model's, or comparing compiled with eager proves nothing."""
    x = batch(b=2, t=12)
    adapted = _adapted(variant, None if variant == "adaption_prompt" else [1])(input_ids=x, labels=x).loss
    assert abs(adapted.item() - tiny_llama()(input_ids=x, labels=x).loss.item()) > 1e-4


@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "layer-1-only"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_layers_give_eager_loss_and_gradients(variant, layers):
    """Adapted on both layers, and on the second only: identical layers share one compiled graph, so a layer that
    differs from the first must not run its graph (adapters hooking some layers did under dynamo's default of no
    guards on module hooks, until compile_model turned them on)."""
    model = _adapted(variant, layers)
    if not layers_compile(model):
        pytest.skip(f"{variant}: its adapter says it does not run inside compiled decoder layers (trains eagerly)")
    reference = copy.deepcopy(model)
    x = batch(b=2, t=12)
    torch.manual_seed(0)
    loss_eager, grads_eager = _step(reference, x)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # dynamo's default, whatever ran before
        compile_model(model, "aot_eager", "layers")
        torch.manual_seed(0)
        loss_compiled, grads_compiled = _step(model, x)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    assert {n for n, g in grads_compiled.items() if g is None} == {n for n, g in grads_eager.items() if g is None}
    assert any(g is not None for g in grads_eager.values()), variant
    for name, grad in grads_eager.items():
        if grad is not None:
            torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_oft_keeps_no_tensor_made_in_the_trace():
    """OFT's upper-triangle indices are cached per size and device for eager calls; a compiled layer computes them in
    its graph instead: a tensor made while tracing and kept in the cache would be an output of the compiled graph,
    which CUDA graphs overwrite on their next replay (OFT's graphs failed so on an H100)."""
    from peftlab.ops import orthogonal

    model = _adapted("oft")
    x = batch()
    ref_loss, ref = _step(copy.deepcopy(model), x)
    orthogonal._UPPER.clear()
    compile_model(model, "aot_eager", "layers")
    loss, grads = _step(model, x)
    assert orthogonal._UPPER == {}
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], msg=name)


def _compiled_step_graphs(model, x) -> int:
    """One step of ``model`` with compiled layers (``aot_eager``) against an eager copy's: loss and gradients equal.
    Returns the number of graphs the step compiled."""
    from torch._dynamo.utils import counters

    loss_eager, grads_eager = _step(copy.deepcopy(model), x)
    counters.clear()
    compile_model(model, "aot_eager", "layers")
    loss, grads = _step(model, x)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return counters["stats"]["unique_graphs"]


def test_every_layer_compiles_where_each_needs_its_own_graph():
    """Prefix tuning's layers each read their own KV-cache entry, so each compiles its own graph; with more layers
    than dynamo's default limit (8 graphs a code object) the layers past the 8th ran eager until compile_model made
    room for all of them (with grad and without)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    layers = 10
    model = tiny_llama(layers=layers)
    model.config.use_cache = False
    peftlab.attach(model, peftlab.variants()["prefix_tuning"](None, 4))
    x = batch(b=2, t=12)
    assert _compiled_step_graphs(model, x) == layers + 1  # and the final norm's
    with torch.no_grad():
        model.eval()(input_ids=x)
    assert counters["stats"]["unique_graphs"] == 2 * (layers + 1)


@pytest.mark.parametrize("variant", ["adamss", "tinylora"])
def test_layers_whose_adapters_differ_only_in_sizes_or_rows_share_one_graph(variant):
    """AdaMSS's k-means gives each linear its own group sizes, and TinyLoRA's layers read their tied vector by the
    layer's name: with a parameter per group, or a lookup by name, each compiled decoder layer guarded on those and
    compiled its own graph (16 on the 1B shape: AdaMSS's GPU row ran past 270 s). AdaMSS packs its groups into one A
    and one flat B, TinyLoRA's vectors are rows of one parameter picked by an index tensor: layers of one shape share
    a graph (the first layer takes a second one: its input needs no grad; the final norm a third)."""
    torch._dynamo.reset()
    model = tiny_llama(layers=4)
    model.config.use_cache = False
    peftlab.attach(model, peftlab.variants()[variant](["q_proj", "v_proj", "down_proj"], 4))
    randomize_adapters(model)
    assert _compiled_step_graphs(model, batch(b=2, t=12)) == 3


def test_adamss_groups_differ_between_layers():
    """What makes the AdaMSS case above a test: its layers' group sizes differ."""
    from peftlab.core.inject import adapter_layers

    model = tiny_llama(layers=4)
    peftlab.attach(model, peftlab.variants()["adamss"](["q_proj"], 4))
    assert len({tuple(layer.sizes) for _, _, layer in adapter_layers(model)}) > 1


def test_compiled_layers_include_the_final_norm(monkeypatch):
    """The final norm is compiled with the layers (eager, it kept its fp32 input for backward, 32 MiB in the 1B
    step's peak), found as the blocks' owner's one norm child: Llama's ``model.norm``, GPT-2's ``ln_f``, LN tuning's
    adapted norm; ``PEFTLAB_COMPILE_FINAL_NORM=0`` leaves it out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftlab.core.adapter import AdaptedModule
    from peftlab.core.blocks import final_norm
    from peftlab.train.packing import compiled_modules

    model = tiny_llama()
    assert compiled_modules(model, "layers")[-1] is model.model.norm and final_norm(model) is model.model.norm
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    assert final_norm(gpt2) is gpt2.transformer.ln_f
    peftlab.attach(model, peftlab.variants()["ln_tuning"](None, 4))
    assert isinstance(model.model.norm, AdaptedModule) and final_norm(model) is model.model.norm
    monkeypatch.setenv("PEFTLAB_COMPILE_FINAL_NORM", "0")
    assert list(compiled_modules(model, "layers")) == list(model.model.layers)
