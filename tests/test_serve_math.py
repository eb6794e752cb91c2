"""Batched serving maths: mixed adapters of mixed methods in one batch == each token through its own adapter.

References: ``ServingForm.apply`` per token (dense, one adapter at a time) and, for the forms themselves,
the adapted module of the method's own layer. The Triton kernels against their references: test_serve_kernels.py.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

import peftlab  # noqa: E402
from peftlab.core.inject import adapted_modules  # noqa: E402
from peftlab.serve.batched import group_by_slot, table_rows  # noqa: E402
from peftlab.serve.layers import FOLD_RANK  # noqa: E402

from models import randomize_adapters, tiny_llama  # noqa: E402
from serve_forms import IN, _forms, _layer  # noqa: E402


def _dense(forms_by_slot, slots, x, base):
    rows = []
    for t, s in enumerate(slots):
        if s not in forms_by_slot:  # -1 or an empty slot: the base model
            rows.append(base(x[t]))
        else:
            rows.append(forms_by_slot[s].apply(x[t], base.weight, base.bias))
    return torch.stack(rows)


@pytest.mark.parametrize("fold_rank", [FOLD_RANK, 0], ids=["vera-folded", "vera-shared"])
def test_mixed_batch_equals_each_adapter_alone(fold_rank):
    g = torch.Generator().manual_seed(0)
    forms = _forms(g)
    layer, ctx = _layer(capacity=10, fold_rank=fold_rank)
    placement = {slot: form for slot, form in zip([3, 0, 9, 1, 5, 2, 7, 4], forms)}
    for slot, form in placement.items():
        layer.set_slot(slot, form)
    if fold_rank:  # VeRA slots are LoRA slots of the grouped kernel
        assert not layer.vera_slots and {2, 7, 4} <= layer.lora_slots
    else:
        assert len([u for u in layer.proj_users if u]) == 2  # the shared VeRA projection is stored once
    slots = [3, -1, 0, 9, 9, 1, 5, 2, 7, 4, -1, 3, 0, 7, 2]
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)
    ctx.set(slots, "cpu")
    got = layer(x)
    want = _dense(placement, slots, x, layer.base)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # 3-D input (batch, time, in) as the model passes it
    torch.testing.assert_close(layer(x[None])[0], want, rtol=1e-10, atol=1e-10)
    # the fixed-shape step of serve/graphs.py: every token's adapter gathered by its table row, no grouping
    ctx.static_rows = table_rows(slots, 10)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    ctx.static_rows = None
    for slot in (2, 4):  # a VeRA slot cleared and reused by a LoRA, or left empty: no VeRA term stays behind
        layer.clear_slot(slot)
    layer.set_slot(2, forms[0])
    placement.pop(4)
    placement[2] = forms[0]
    ctx.static_rows = table_rows(slots, 10)
    torch.testing.assert_close(layer(x), _dense(placement, slots, x, layer.base), rtol=1e-10, atol=1e-10)


def test_fixed_shape_step_with_one_vera_projection_pair():
    """The fixed-shape step's single-pair VeRA path (two plain products) next to LoRA, DoRA and IA3 == dense."""
    g = torch.Generator().manual_seed(5)
    forms = _forms(g)
    layer, ctx = _layer(capacity=6, fold_rank=0)
    placement = {0: forms[0], 1: forms[2], 2: forms[3], 3: forms[5], 4: forms[6]}  # forms 5 and 6 share P
    for slot, form in placement.items():
        layer.set_slot(slot, form)
    assert layer.proj_down_t.shape[0] == 1
    slots = [3, 0, -1, 4, 1, 2, 3, 5, 4]
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)
    ctx.static_rows = table_rows(slots, 6)
    torch.testing.assert_close(layer(x), _dense(placement, slots, x, layer.base), rtol=1e-10, atol=1e-10)


def _check_slot_mix(slots, placement, seed, fold_rank):
    g = torch.Generator().manual_seed(seed)
    forms = _forms(g)
    layer, ctx = _layer(capacity=8, fold_rank=fold_rank)
    by_slot = {slot: form for slot, form in zip(placement, forms)}
    for slot, form in by_slot.items():
        layer.set_slot(slot, form)
    x = torch.randn(len(slots), IN, generator=g, dtype=torch.float64)
    ctx.set(slots, "cpu")
    torch.testing.assert_close(layer(x), _dense(by_slot, slots, x, layer.base), rtol=1e-10, atol=1e-10)


def test_any_slot_mix_equals_dense_reference():
    """Property: for any token -> slot assignment and any placement of the forms in slots, batched == dense."""
    hypothesis = pytest.importorskip("hypothesis")  # a test extra; the GPU machine may lack it
    st = hypothesis.strategies
    check = hypothesis.settings(max_examples=25, deadline=None)(hypothesis.given(
        st.lists(st.integers(-1, 7), min_size=1, max_size=40), st.permutations(range(8)), st.integers(0, 2**16),
        st.sampled_from([FOLD_RANK, 0]))(
        _check_slot_mix))
    check()


def test_slots_clear_and_reuse():
    g = torch.Generator().manual_seed(1)
    forms = _forms(g)
    layer, ctx = _layer(capacity=3)
    layer.set_slot(0, forms[2])
    layer.set_slot(1, forms[5])
    layer.set_slot(2, forms[4])
    x = torch.randn(3, IN, generator=g, dtype=torch.float64)
    ctx.set([0, 1, 2], "cpu")
    for slot in range(3):
        layer.clear_slot(slot)
    torch.testing.assert_close(layer(x), layer.base(x))  # cleared slots are the base model
    layer.set_slot(1, forms[1])  # rank 8 > initial 4: tables grow
    layer.set_slot(0, forms[6])
    want = _dense({1: forms[1], 0: forms[6]}, [0, 1, 2], x, layer.base)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    # a slot overwritten without clear_slot: a narrower LoRA over a full-width one (its old rows must go), then a
    # full-width one over that (rows overwritten whole, not zeroed first), a LoRA over a VeRA slot
    layer.set_slot(1, forms[0])
    torch.testing.assert_close(layer(x), _dense({1: forms[0], 0: forms[6]}, [0, 1, 2], x, layer.base), rtol=1e-10,
                               atol=1e-10)
    layer.set_slot(1, forms[1])
    layer.set_slot(0, forms[1])
    layer.set_slot(2, forms[0])
    want = _dense({1: forms[1], 0: forms[1], 2: forms[0]}, [0, 1, 2], x, layer.base)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_group_by_slot_segments():
    seg = group_by_slot([2, -1, 0, 2, 2, -1, 0])
    assert seg.slots_cpu == (0, 2) and seg.starts_cpu == (0, 2, 5) and seg.max_len == 3
    assert seg.order.tolist() == [2, 6, 0, 3, 4]
    assert group_by_slot([-1, -1]).empty


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "vera", "vblora", "unilora", "tinylora", "molora"])
def test_serving_form_equals_the_adapted_module(method):
    """Each method's own layer is the reference for its serving form (all-linear targets of a tiny Llama)."""
    model = tiny_llama()
    config = peftlab.variants()[method](["q_proj", "v_proj", "down_proj", "up_proj"], 4)
    peftlab.attach(model, config)
    randomize_adapters(model, seed=3, std=0.2)
    x = torch.randn(5, 48)
    for name, module in adapted_modules(model):
        layer = module.adapters["default"]
        assert layer.batched_serving
        form = layer.serving_form(module.view)
        xin = x[:, : module.view.in_features]
        torch.testing.assert_close(form.apply(xin, module.view.weight_oi(), module.view.bias), module(xin),
                                   rtol=1e-5, atol=1e-5, msg=f"{method} {name}")


@pytest.mark.parametrize("variant", sorted(peftlab.variants()))
def test_every_method_is_served_or_refused_with_a_reason(variant, tmp_path):
    """Over the registry: a weight method is served natively (serving_form) or as a LoRA of its update, and the
    served form equals the method's own module (full-rank conversion: exact up to rounding); an input-side method
    is served as virtual tokens equal to its own, or in the sub-layer tables as its own hooks (bottleneck adapters),
    or in the prompt-attention tables as its own attention hook (LLaMA-Adapter);
    KV-prefix, other module-hook and non-mergeable methods, updates of other layers than linears (LN tuning's norms)
    and trainable token rows are refused with a ServeError."""
    from peftlab.core.input_side import hooked
    from peftlab.core.registry import method_for
    from peftlab.serve.engine import Engine, EngineConfig
    from peftlab.serve.store import ServeError, check_servable, forms_of

    model = tiny_llama()
    config = peftlab.variants()[variant](["q_proj", "v_proj", "down_proj"], 4)
    method = method_for(config)
    if method.kind == "input":
        peftlab.attach(model, config)
        randomize_adapters(model, seed=1, std=0.2)
        peftlab.save_adapter(model, tmp_path / variant)
        engine = Engine(tiny_llama(), EngineConfig(kv_tokens=256, block_size=4, max_gpu_adapters=1))
        engine.store.register(variant, tmp_path / variant, check_root=False)
        own = hooked(model)["default"].eval()
        if not own.handles:  # virtual tokens or a KV prefix: served
            assert engine.store.acquire(variant, load_from_disk=True) == -1
            virtual, prefix_kv = engine.store.input_side(variant)
            with torch.no_grad():
                if own.num_virtual_tokens:
                    torch.testing.assert_close(virtual, own.virtual_tokens(1, torch.float32)[0])
                if own.num_prefix_tokens:
                    from transformers import DynamicCache

                    cache = DynamicCache(config=model.config)
                    own.write_prefix(cache, 1, torch.float32)
                    for layer in range(model.config.num_hidden_layers):
                        k, v = cache.layers[layer].keys, cache.layers[layer].values
                        torch.testing.assert_close(prefix_kv[layer, 0], k[0].transpose(0, 1))
                        torch.testing.assert_close(prefix_kv[layer, 1], v[0].transpose(0, 1))
            assert (virtual is not None) == bool(own.num_virtual_tokens)
            assert (prefix_kv is not None) == bool(own.num_prefix_tokens)
        elif own.sublayer_serving:  # whole sub-layers (bottleneck adapters): a slot in the sub-layer tables
            slot = engine.store.acquire(variant, load_from_disk=True)
            own.active = True
            for i, name in enumerate(own.names):
                x, y = torch.randn(3, 32), torch.randn(3, 32)
                with torch.no_grad():
                    torch.testing.assert_close(engine.sublayers[name].slot_form(slot).apply(x, y),
                                               own._adapt(i, None, (x,), {}, y), msg=f"{variant} {name}")
        elif own.prompt_attention_serving:  # attention over its own keys/values (LLaMA-Adapter): prompt tables
            from transformers.models.llama.modeling_llama import rotate_half

            slot = engine.store.acquire(variant, load_from_disk=True)
            own.active = True
            T = 3
            for i, name in enumerate(own.names):
                attn, table = model.get_submodule(name), engine.prompt_attention[name]
                hidden, o = torch.randn(1, T, 32), torch.randn(T, 4, 8)
                cos, sin = model.model.rotary_emb(hidden, torch.arange(T)[None])
                q = attn.q_proj(hidden).view(1, T, 4, 8).transpose(1, 2)
                q = (q * cos[:, None] + rotate_half(q) * sin[:, None])[0].transpose(0, 1)
                with torch.no_grad():  # through o_proj (no bias here), as the served forward adds it
                    served = table.slot_form(slot).apply(q, o).reshape(T, -1) @ attn.o_proj.weight.T
                    mine = own.adaption_output(attn, hidden, (cos, sin), own.prompts[i], own.gates[i])[0]
                    torch.testing.assert_close(served, o.reshape(T, -1) @ attn.o_proj.weight.T + mine,
                                               msg=f"{variant} {name}")
        else:
            with pytest.raises(ServeError, match="model hooks"):
                engine.store.acquire(variant, load_from_disk=True)
        assert not hasattr(engine.model, "peftlab_hooked")
        return
    if config.trainable_tokens():  # embedding rows (TRAINABLE_TOKENS) have no place in the slot tables
        with pytest.raises(ServeError, match="trainable tokens"):
            check_servable(config, variant)
        return
    check_servable(config, variant)
    peftlab.attach(model, config)
    randomize_adapters(model, seed=1, std=0.2)
    layers = [(name, module, module.adapters["default"]) for name, module in adapted_modules(model)]
    servable = [layer.batched_serving or (layer.mergeable and mod.view.kind == "linear") for _, mod, layer in layers]
    if not all(servable):
        with pytest.raises(ServeError, match="no batched serving form"):
            forms_of(model, "default", 64)
        return
    forms, converted = forms_of(model, "default", 64)
    assert bool(converted) == (not layers[0][2].batched_serving)
    assert all(err < 1e-5 for err in converted.values())
    if converted:  # at rank 1 the conversion loses something, and says how much
        _, rank1 = forms_of(model, "default", 1)
        assert set(rank1) == set(converted) and max(rank1.values()) > 1e-3
    for name, module, _ in layers:
        x = torch.randn(3, module.view.in_features)
        torch.testing.assert_close(forms[name].apply(x, module.view.weight_oi(), module.view.bias), module(x),
                                   rtol=1e-4, atol=1e-5, msg=f"{variant} {name}")


@pytest.mark.parametrize("starts,lens", [((0, 0, 0), (5, 5, 5)), ((0, 0, 3), (7, 2, 4)), ((4, 0), (1 + 2, 6))],
                         ids=["equal_causal", "ragged_with_prefix", "prefix_and_fresh"])
def test_prefills_in_one_padded_call_equal_one_by_one(starts, lens, monkeypatch):
    """The padded prefill attention (forward._batched_prefills) gives each chunk what attending it alone gives,
    beside a decode token, with ragged lengths and cached prefixes (start > 0)."""
    from peftlab.serve import forward
    from peftlab.serve.forward import Chunk, _attention, _plan
    from peftlab.serve.kv import PagedKVCache

    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(1, 16, 4, 2, 8, torch.float32, "cpu")
    chunks = []
    for sid, (start, n) in enumerate(zip(starts, lens)):
        cache.reserve(sid, start + n + 1)
        chunks.append(Chunk(sid, [1] * n, start))
    cache.reserve(9, 6)
    chunks.insert(1, Chunk(9, [1], 5))  # a decode token among the prefills
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    q = torch.randn(sum(len(c.tokens) for c in chunks), 4, 8, generator=g)
    plan = _plan(chunks, cache, "cpu")
    assert plan.batched is not None and (plan.batched.mask is None) == (starts == (0, 0, 0))
    got = _attention(q, cache, 0, plan, 0.3)
    monkeypatch.setattr(forward, "PREFILL_PAD_MAX", 0)  # one by one
    alone = _plan(chunks, cache, "cpu")
    assert alone.batched is None
    torch.testing.assert_close(got, _attention(q, cache, 0, alone, 0.3), rtol=1e-5, atol=1e-6)
