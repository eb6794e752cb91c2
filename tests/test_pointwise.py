"""Compiled layers that recompute their pointwise work (peftlab/train/pointwise.py, TrainArgs.recompute_pointwise):
what the layers keep for backward (counted through saved-tensor hooks) against the plain compiled layers, with the
same loss and gradients, for the fused nodes (PEFTLAB_FAST=1, CUDA's default) and the reference path."""
import warnings

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import peftlab
from models import randomize_adapters, tiny_llama
from peftlab.core.config import ConfigError
from peftlab.train.args import TrainArgs
from peftlab.train.packing import compiled_steps

IDS = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(0))


def _run(variant, pointwise, compile_="aot_eager", dtype=torch.float32, dropout=None):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama(layers=1).to(dtype)
    model.config.use_cache = False
    config = peftlab.variants()[variant]("all-linear", 4)
    if dropout is not None:
        config.lora_dropout = dropout
    peftlab.attach(model, config)
    randomize_adapters(model, seed=3, std=0.05)  # away from the identity start: every gradient non-trivial
    model.train()
    args = TrainArgs(compile=compile_, compile_scope="layers", recompute_pointwise=pointwise)
    sizes = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            sizes.append(t.numel() * t.element_size())
        return t

    with compiled_steps(args, model, torch.device("cpu")) as state:
        assert state.describe()["recompute_pointwise"] is pointwise  # what metrics.json records
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(sizes), loss.detach(), grads


def _compare(variant, **kwargs):
    kept, loss, grads = _run(variant, False, **kwargs)
    kept_pw, loss_pw, grads_pw = _run(variant, True, **kwargs)
    torch.testing.assert_close(loss_pw, loss)
    assert grads.keys() == grads_pw.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_pw[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    return kept, kept_pw


@pytest.mark.parametrize("variant", ["dora", "loha", "lokr", "ia3", "oft", "hra", "adalora", "vera", "tied_lora"])
def test_same_gradients_and_never_more_kept(variant, monkeypatch):
    """The fused nodes, as on CUDA: the same loss and gradients, and never more kept than the plain compiled layers."""
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    kept, kept_pw = _compare(variant)
    assert kept_pw <= kept, (kept_pw, kept)


@pytest.mark.parametrize("fast", ["0", "1"])
def test_lora_keeps_less(fast, monkeypatch):
    """LoRA in bf16 (the GPU's training dtype). The fused node keeps each adapted linear's input, which the policy
    rebuilds from the norms' input and gate / up: at least 10% less kept. On the reference path the partitioner
    already recomputes those (5% less here)."""
    monkeypatch.setenv("PEFTLAB_FAST", fast)
    kept, kept_pw = _compare("lora", dtype=torch.bfloat16)
    assert kept_pw < (0.9 if fast == "1" else 1.0) * kept, (kept_pw, kept)


def test_per_module_ops():
    """The per-module rule: no tensor read with a token dimension or a symbolic one, and a rank-sized result (a
    vector, a rank-r factor, a Gram matrix; not weight-shaped, not VeRA's rank-256 projections or LoHa's rank-r^2
    products); a factory (no tensor input) is not per-module; the token dimensions come from the first tensor of three
    or more dimensions the region reads."""
    from peftlab.train.pointwise import SMALL_REST, PerModuleRule, per_module, result_shape, token_dims_of

    aten = torch.ops.aten
    hidden = torch.empty(4, 1024, 64)
    tokens = token_dims_of(hidden)
    assert tokens == frozenset({1024, 4096})
    vector, factor, acts = torch.empty(2048), torch.empty(16, 2048), torch.empty(4096, 2048)
    weight = torch.empty(2048, 2048)

    def small(op, *args):
        return per_module([a for a in args if isinstance(a, torch.Tensor)], tokens, op, args)

    assert small(aten.mul.Tensor, factor, vector) and small(aten.mul.Tensor, torch.empty(2048, 16), 2.0)
    assert not small(aten.mul.Tensor, vector, acts)
    assert not small(aten.mul.Tensor, torch.empty(4, 1024, 8), 2.0)  # a token dimension
    assert not small(aten.mul.Tensor, torch.empty(300, 300), 2.0)  # weight-shaped
    assert small(aten.mul.Tensor, torch.empty(16, 16), torch.empty(8192, 1, SMALL_REST))  # a Gram matrix, a factor
    assert not small(aten._to_copy.default, torch.empty(256, 2048))  # VeRA's projection, LoHa's rank-r^2 factor
    assert not small(aten.mul.Tensor, torch.empty(2048, 1, 16), torch.empty(2048, 16, 1))  # LoHa's r^2 product
    assert not small(aten.mul.Tensor, torch.empty(32, 64, 64), 2.0)  # OFT's blocks
    assert small(aten.sum.dim_IntList, weight, [1])  # a weight's row norms: a vector
    assert small(aten.sum.dim_IntList, torch.empty(16, 16, 8192), [-1])  # DoRA's Gram matrix as a broadcast sum
    assert not small(aten.sum.dim_IntList, torch.empty(2, 2048, 2048), [0])
    assert result_shape(aten.sum.dim_IntList, (weight, [0], True), [weight]) == (1, 2048)
    assert result_shape(aten.linalg_vector_norm.default, (weight, 2, [1]), [weight]) == (2048,)
    assert result_shape(aten.sum.default, (weight,), [weight]) == ()
    assert not per_module([], tokens)
    rule = PerModuleRule()
    assert rule(None, aten.sqrt.default, vector) == CheckpointPolicy.PREFER_RECOMPUTE  # no block input seen yet
    assert rule(None, aten.mul.Tensor, hidden, 2.0) == CheckpointPolicy.PREFER_RECOMPUTE
    assert rule.token_dims == tokens
    assert rule(None, aten.sqrt.default, vector) == CheckpointPolicy.MUST_SAVE
    assert rule(None, aten.mm.default, acts, factor.t()) == CheckpointPolicy.MUST_SAVE  # a product, as before
    assert rule(None, aten._to_copy.default, weight) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("save_small", ["0", "1"])
def test_one_graph_for_new_lengths(save_small, monkeypatch):
    """Packed batches change length: after the one recompile with dynamic sizes, new lengths reuse the graph, with or
    without the per-module rule (which reads sizes only while AOTAutograd traces, and never makes them concrete)."""
    from torch._dynamo.utils import counters

    from peftlab.train.packing import compile_model
    from peftlab.train.pointwise import recompute_pointwise

    monkeypatch.setenv("PEFTLAB_FAST", "1")
    monkeypatch.setenv("PEFTLAB_POINTWISE_SAVE_SMALL", save_small)
    torch._dynamo.reset()
    counters.clear()
    model = tiny_llama(layers=1)
    model.config.use_cache = False
    peftlab.attach(model, peftlab.variants()["dora"]("all-linear", 4))
    compile_model(model, "aot_eager", "layers")
    graphs = []
    with recompute_pointwise(model):
        for length in (32, 40, 48, 56):
            ids = torch.randint(3, 90, (2, length), generator=torch.Generator().manual_seed(length))
            model(input_ids=ids, labels=ids).loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[1] == graphs[2] == graphs[3] > graphs[0], graphs


@pytest.mark.parametrize("save_small", ["0", "1"])
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_save_small_same_gradients(variant, save_small, monkeypatch):
    """Per-module ops kept (the default) or recomputed (PEFTLAB_POINTWISE_SAVE_SMALL=0), on the fused nodes: the same
    loss and gradients as the plain compiled layers, and no more kept."""
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    monkeypatch.setenv("PEFTLAB_POINTWISE_SAVE_SMALL", save_small)
    from peftlab.train import pointwise

    rule, kept_ops = pointwise.per_module, []

    def counting(*args):
        kept_ops.append(rule(*args))
        return kept_ops[-1]

    monkeypatch.setattr(pointwise, "per_module", counting)
    kept, kept_pw = _compare(variant)
    assert kept_pw <= kept, (kept_pw, kept)
    if save_small == "1":  # the rule kept some ops and left others to the recompute
        assert any(kept_ops) and not all(kept_ops)
    else:
        assert not kept_ops


def test_with_inductor_and_dropout(monkeypatch):
    """Inductor (the trainer's backend) with LoRA dropout: random ops are kept, not drawn again, so the same seed
    gives the same loss and gradients."""
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    kept, kept_pw = _compare("lora", compile_="inductor", dropout=0.1)
    assert kept_pw <= kept


def test_settings_and_eager_layers():
    with pytest.raises(ConfigError, match="recompute_pointwise acts on compiled layers"):
        TrainArgs(compile=None, recompute_pointwise=True).validate()
    with pytest.raises(ConfigError, match="cannot be combined with checkpointing 'on'"):
        TrainArgs(recompute_pointwise=True, checkpointing="on").validate()
    with pytest.raises(ConfigError, match="activation_budget 0.5"):
        TrainArgs(recompute_pointwise=True, activation_budget=0.5).validate()
    model = tiny_llama(layers=1)
    with warnings.catch_warnings(record=True) as caught:  # "auto" on the CPU: eager layers, nothing to do
        warnings.simplefilter("always")
        with compiled_steps(TrainArgs(recompute_pointwise=True), model, torch.device("cpu")):
            assert "forward" not in model.model.layers[0].__dict__
    assert any("recompute_pointwise has no effect" in str(w.message) for w in caught)


def test_auto_setting():
    """None ("auto"): on for inductor's compiled decoder layers on CUDA when nothing else decides what they keep and
    every adapter gains from it (measured: ``recomputes_pointwise``); True / False as asked (True without a backend:
    nothing to wrap)."""
    from peftlab.train.packing import pointwise_gains, resolve_pointwise

    gains = {}
    for variants in (["lora"], ["dora"], ["ia3"], ["prompt_tuning"], ["lora", "ia3"], []):
        model = tiny_llama(layers=1)
        for i, variant in enumerate(variants):
            peftlab.attach(model, peftlab.variants()[variant]("all-linear", 4), name=f"a{i}")
        gains[",".join(variants)] = pointwise_gains(model)
    assert gains == {"lora": True, "dora": True, "ia3": False, "prompt_tuning": False, "lora,ia3": False, "": False}

    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def on(backend="inductor", scope="layers", device=cuda, gain=True, distributed=False, **settings):
        return resolve_pointwise(TrainArgs(**settings), backend, scope, device, gain, distributed)
    assert on()
    assert not on(gain=False)
    assert not on(distributed=True)
    assert not on(packing=True)
    assert not on(device=cpu)
    assert not on(scope="adapted")
    assert not on(backend="aot_eager")
    assert not on(checkpointing="on")
    assert not on(activation_budget=0.5)
    assert not on(recompute_pointwise=False)
    assert on(backend="aot_eager", scope="adapted", device=cpu, gain=False, recompute_pointwise=True)
    assert not on(backend=None, device=cpu, recompute_pointwise=True)
    with pytest.raises(ConfigError, match="recompute_pointwise must be None"):
        TrainArgs(recompute_pointwise="yes").validate()
    model = tiny_llama(layers=1)
    with warnings.catch_warnings(record=True) as caught:  # the default on the CPU: eager layers, no warning
        warnings.simplefilter("always")
        with compiled_steps(TrainArgs(), model, torch.device("cpu")):
            assert "forward" not in model.model.layers[0].__dict__
    assert not any("recompute_pointwise" in str(w.message) for w in caught)
