"""DoRA's ||W0||^2 per row (peftlab/methods/dora.py): compiled layers read the cached value instead of reducing every
base weight at each call, and the model-level pre-hook (core/hooks.py, ``refreshes_caches``) brings the cache up to
date when the base weight changes. Graphs are captured with aot_eager on the CPU, the fused node on (CUDA's path)."""
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import peftlab
from models import randomize_adapters, tiny_llama
from peftlab.core.inject import adapter_layers
from peftlab.train.packing import compile_model

IDS = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    model.config.use_cache = False
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                             use_dora=True))
    randomize_adapters(model, seed=3, std=0.05)
    return model


def _compiled(model, graphs: list):
    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    compile_model(model, aot_autograd(fw_compiler=keep, bw_compiler=keep), "layers")


def _weight_reductions(graphs, model) -> int:
    """Nodes of the captured graphs that square a tensor of a DoRA base weight's shape."""
    shapes = {tuple(module.base_layer.weight.shape) for module in model.modules() if hasattr(module, "base_layer")}
    count = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            arg = node.args[0] if node.args else None
            val = getattr(arg, "meta", {}).get("val") if hasattr(arg, "meta") else None
            if node.op == "call_function" and "pow" in str(node.target) and val is not None \
                    and tuple(val.shape) in shapes:
                count += 1
    return count


def _loss_and_grads(model):
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("cache", ["1", "0"])
def test_compiled_layers_read_the_cache_and_match_eager(cache, monkeypatch):
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    monkeypatch.setenv("PEFTLAB_DORA_NORM_CACHE", cache)
    torch._dynamo.reset()
    model = _model()
    ref_loss, ref_grads = _loss_and_grads(model)
    graphs = []
    _compiled(model, graphs)
    loss, grads = _loss_and_grads(model)
    assert graphs
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any("magnitude" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    # two DoRA modules, one reduction each when the graph computes ||W0||^2 itself (the A/B knob), none with the cache
    assert _weight_reductions(graphs, model) == (0 if cache == "1" else 2)


def test_a_changed_base_weight_is_seen_by_the_compiled_layers(monkeypatch):
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    torch._dynamo.reset()
    model, eager = _model(), _model()
    _compiled(model, [])
    _loss_and_grads(model)
    for m in (model, eager):
        with torch.no_grad():  # in place, as a load_state_dict into the base would
            m.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    loss, grads = _loss_and_grads(model)
    ref_loss, ref_grads = _loss_and_grads(eager)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    layer = model.model.layers[0].self_attn.q_proj
    dora = next(iter(layer.adapters.values()))
    torch.testing.assert_close(dora._w0_sq_value, layer.base_layer.weight.detach().float().pow(2).sum(1))


def test_only_a_changed_base_weight_is_reduced_again(monkeypatch):
    model = _model()
    layers = [layer for _, _, layer in adapter_layers(model)]
    cached = [layer._w0_sq_value for layer in layers]
    model(input_ids=IDS)
    assert all(layer._w0_sq_value is c for layer, c in zip(layers, cached))  # same weights: kept
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.base_layer.weight.add_(1.0)
    model(input_ids=IDS)
    changed = [layer._w0_sq_value is not c for layer, c in zip(layers, cached)]
    assert sorted(changed) == [False, True]


def test_a_meta_model_attaches_without_a_cache():
    with torch.device("meta"):
        model = tiny_llama(layers=1)
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert all(layer._w0_sq_value is None for _, _, layer in adapter_layers(model))
