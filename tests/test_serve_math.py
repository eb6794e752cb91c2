"""Batched serving maths: mixed adapters of mixed methods in one batch == each token through its own adapter.

References: ``ServingForm.apply`` per token (dense, one adapter at a time) and, for the forms themselves,
the adapted module of the method's own layer. The Triton kernel runs in the interpreter on CPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

import peftlab  # noqa: E402
from peftlab.core.adapter import ServingForm  # noqa: E402
from peftlab.core.inject import adapted_modules  # noqa: E402
from peftlab.serve.batched import group_by_slot, lowrank_torch, row_lowrank, table_rows  # noqa: E402
from peftlab.serve.layers import FOLD_RANK, BatchedLinear, StepContext  # noqa: E402

from models import randomize_adapters, tiny_llama  # noqa: E402

IN, OUT = 24, 20


def _forms(g: torch.Generator) -> list[ServingForm]:
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    proj_a, proj_b = rnd(6, IN), rnd(OUT, 6)
    return [
        ServingForm(down=rnd(2, IN), up=rnd(OUT, 2)),  # LoRA r2
        ServingForm(down=rnd(8, IN), up=rnd(OUT, 8)),  # LoRA r8 (mixed ranks)
        ServingForm(down=rnd(4, IN), up=rnd(OUT, 4), out_scale=1 + 0.1 * rnd(OUT)),  # DoRA
        ServingForm(in_scale=1 + 0.1 * rnd(IN)),  # IA3 feedforward
        ServingForm(out_scale=1 + 0.1 * rnd(OUT), scale_bias=True),  # IA3 output
        ServingForm(down=proj_a, up=proj_b, mid_scale=rnd(6), up_scale=rnd(OUT), shared_projection=True),  # VeRA
        ServingForm(down=proj_a, up=proj_b, mid_scale=rnd(6), up_scale=rnd(OUT), shared_projection=True),  # same P
        ServingForm(down=rnd(3, IN), up=rnd(OUT, 3), mid_scale=rnd(3), up_scale=rnd(OUT), shared_projection=True),
    ]


def _layer(capacity: int, use_triton: bool = False, dtype=torch.float64,
           device="cpu", fold_rank: int = FOLD_RANK) -> tuple[BatchedLinear, StepContext]:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=True).to(device, dtype)
    ctx = StepContext(capacity)
    return BatchedLinear(base, "lin", capacity, ctx, use_triton=use_triton, initial_rank=4, fold_rank=fold_rank), ctx


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


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "vera", "vblora", "unilora", "tinylora"])
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
    is served as virtual tokens equal to its own; KV-prefix, module-hook and non-mergeable methods, updates of
    other layers than linears (LN tuning's norms) and trainable token rows are refused with a ServeError."""
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


def _triton_case(dtype, device):
    g = torch.Generator().manual_seed(2)
    S, R = 5, 8
    down = torch.randn(S + 1, R, IN, generator=g).to(device, dtype)
    up = torch.randn(S + 1, OUT, R, generator=g).to(device, dtype)
    down[-1].zero_(), up[-1].zero_()
    ranks = [2, 8, 5, 0, 3, 0]
    for s, r in enumerate(ranks):  # mixed ranks: zero padding beyond each slot's rank
        down[s, r:].zero_()
        up[s, :, r:].zero_()
    slots = [0, 1, -1, 4, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, 4]  # a segment > BLOCK_M
    x = torch.randn(len(slots), IN, generator=g).to(device, dtype)
    seg = group_by_slot(slots, device)
    return x, down, up, seg, ranks


@pytest.mark.parametrize("fused", [False, True])
def test_triton_grouped_lowrank_matches_torch(fused, monkeypatch):
    import peftlab.serve.batched as batched

    monkeypatch.setattr(batched, "FUSED_MAX_TOKENS", 10**6 if fused else 0)  # the decode or the prefill path
    x, down, up, seg, ranks = _triton_case(torch.float32, "cpu" if not torch.cuda.is_available() else "cuda")
    base = torch.randn(x.shape[0], OUT, device=x.device)
    want = lowrank_torch(x, down, up, seg, ranks, out=base.clone())
    got = batched.lowrank_triton(x, down, up, seg, out=base.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernel on the GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_triton_grouped_lowrank_bf16_cuda(fused, monkeypatch):
    import peftlab.serve.batched as batched

    monkeypatch.setattr(batched, "FUSED_MAX_TOKENS", 10**6 if fused else 0)
    x, down, up, seg, ranks = _triton_case(torch.bfloat16, "cuda")
    want = lowrank_torch(x.float(), down.float(), up.float(), seg, ranks)
    got = batched.lowrank_triton(x, down, up, seg).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)


def test_batched_layer_triton_path_matches_torch_path():
    g = torch.Generator().manual_seed(4)
    forms = [f.to(torch.float32) for f in _forms(g)]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    outs = []
    slots = [0, 1, 2, -1, 5, 6, 7, 0, 1]
    x = torch.randn(len(slots), IN, generator=g).to(dev)
    for use_triton in (False, True):
        layer, ctx = _layer(capacity=8, use_triton=use_triton, dtype=torch.float32, device=dev)
        for slot, form in enumerate(forms):
            layer.set_slot(slot, form)
        ctx.set(slots, dev)
        outs.append(layer(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_packed_rows_views_share_one_storage_and_gather_together():
    from peftlab.serve.batched import PackedRows

    packed = PackedRows()
    a, b = torch.randn(5, 3, 4), torch.randn(5, 6)
    packed.set("a", a.clone())
    packed.set("b", b.clone())
    first = packed.data
    packed.get("a")[2, 1].fill_(7.0)  # writes through the view into the packed storage
    a[2, 1] = 7.0
    assert torch.equal(packed.get("a"), a) and torch.equal(packed.get("b"), b)
    rows = torch.tensor([4, 0, 2, 2])
    got = packed.gather(rows)
    assert torch.equal(got["a"], a[rows]) and torch.equal(got["b"], b[rows])
    wider = torch.cat([a, torch.zeros(5, 2, 4)], dim=1)  # a new shape for "a": packed anew, contents kept
    packed.set("a", wider)
    assert packed.data is not first and packed.get("a").shape == (5, 5, 4)
    assert torch.equal(packed.get("a"), wider) and torch.equal(packed.get("b"), b)


def test_row_lowrank_kernels_match_einsum():
    """The fixed-shape step's Triton row kernels against an einsum reference: padded ranks, repeated rows, a rank that
    is not a multiple of the kernels' rank block, dimensions that are not multiples of their tiles; tokens of the
    skipped (identity) row are left exactly as they were."""
    g = torch.Generator().manual_seed(11)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    slots, r, k, n = 5, 6, 70, 45
    down, up = torch.randn(slots + 1, r, k, generator=g).to(dev), torch.randn(slots + 1, n, r, generator=g).to(dev)
    rows = torch.tensor([3, 0, 5, 3, 1, 5, 4], device=dev)
    x, y0 = torch.randn(len(rows), k, generator=g).to(dev), torch.randn(len(rows), n, generator=g).to(dev)
    want = y0 + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
    keep = rows == slots
    want[keep] = y0[keep]
    got = row_lowrank(x, down, up, rows, y0.clone(), skip_row=slots)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[keep], y0[keep])
    with pytest.raises(ValueError, match="row_lowrank: shapes"):
        row_lowrank(x[:, :-1], down, up, rows, y0.clone())
    scale = torch.randn(slots + 1, n, generator=g).to(dev)  # DoRA / IA3's output scale, applied in the kernel
    want = scale[rows] * y0 + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
    want[keep] = y0[keep]
    got = row_lowrank(x, down, up, rows, y0.clone(), skip_row=slots, out_scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out_scale"):
        row_lowrank(x, down, up, rows, y0.clone(), out_scale=scale[:, :-1])
    # a long K: the shrink splits it into chunks (the last one partial) whose partial sums the expand adds
    from peftlab.serve.kernels import row_lowrank as split_kernels

    k, r = 1100, 16
    down, up = torch.randn(slots + 1, r, k, generator=g).to(dev), torch.randn(slots + 1, n, r, generator=g).to(dev)
    x = torch.randn(len(rows), k, generator=g).to(dev)
    want = y0 + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
    want[keep] = y0[keep]
    for max_chunks in (1, 3, 16):
        got = y0.clone()
        split_kernels(x, down, up, rows, got, skip_row=slots, max_chunks=max_chunks)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bias,fold_rank,pairs,row_scales,in_base", [
    (True, FOLD_RANK, 2, True, True), (False, FOLD_RANK, 2, True, True), (False, 0, 2, True, True),
    (False, 0, 1, True, True), (False, 0, 1, True, False), (True, 0, 1, True, True), (False, 0, 1, False, True)],
    ids=["bias", "no_bias_scale_in_kernel", "vera_two_pairs", "vera_one_pair_in_base_gemm", "vera_one_pair_apart",
         "vera_one_pair_bias", "row_scales_off"])
def test_fixed_shape_step_triton_lowrank_matches_torch(monkeypatch, bias, fold_rank, pairs, row_scales, in_base):
    """The fixed-shape step through the Triton row kernels (each token's slot read on the device) equals its gather
    + bmm form, base-model tokens and every method's slot included: with a bias (output scales applied in torch),
    without (the output scale inside the expand kernel), with VeRA on two shared projection pairs beside them (its
    products in torch), and on one pair (its vectors applied in ``row_scaled_matmul``); IA3's input scale by
    ``row_scale`` throughout."""
    import peftlab.serve.kernels as kernels
    import peftlab.serve.layers as layers

    calls = []
    monkeypatch.setattr(layers, "row_lowrank", lambda *a, **kw: calls.append(sorted(kw)) or row_lowrank(*a, **kw))
    vera_calls = []
    real = kernels.row_scaled_matmul
    monkeypatch.setattr(kernels, "row_scaled_matmul", lambda *a, **kw: vera_calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(6)
    forms = [f.to(torch.float32) for f in _forms(g)][:None if pairs == 2 else -1]  # the last VeRA has its own pair
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    slots = [3, 0, -1, 4, 1, 2, 3, 5, 6, -1]
    x = torch.randn(len(slots), IN, generator=g).to(dev)
    outs = []
    for use_triton in (False, True):
        layer, ctx = _layer(capacity=8, use_triton=use_triton, dtype=torch.float32, device=dev, fold_rank=fold_rank)
        if not bias:
            layer.base.bias = None
        w0 = layer.base.weight.detach().clone()
        for slot, form in enumerate(forms):
            layer.set_slot(slot, form)
        # [W0; P_A] stored once, the base weight a view of its first rows, its values unchanged
        # (made with the first pair; with a second one it is left unused)
        assert (layer.cat_weight is not None) == (not bias and fold_rank == 0)
        if layer.cat_weight is not None:
            assert layer.base.weight.data_ptr() == layer.cat_weight.data_ptr() and torch.equal(layer.base.weight, w0)
            assert pairs == 2 or (torch.equal(layer.cat_weight[OUT:], layer.proj_down_t[0])
                                  and layer.proj_down_t.data_ptr() == layer.cat_weight[OUT:].data_ptr())
        ctx.static_rows, ctx.static_triton, ctx.static_row_scales = table_rows(slots, 8, dev), use_triton, row_scales
        ctx.static_vera_in_base = in_base
        linear, cat_products = F.linear, []
        monkeypatch.setattr(F, "linear", lambda inp, w, *a: cat_products.append(w is layer.cat_weight and
                                                                                   w is not None) or linear(inp, w, *a))
        outs.append(layer(x))
        monkeypatch.setattr(F, "linear", linear)
        assert any(cat_products) == (use_triton and in_base and row_scales and not bias and fold_rank == 0
                                     and pairs == 1)
        assert ctx.triton_error is None
    assert calls == [["out_scale", "skip_row"]]  # the Triton side ran the kernels (not torch after a failure)
    assert len(vera_calls) == (fold_rank == 0 and pairs == 1 and row_scales)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_row_scaled_matmul_and_row_scale_match_einsum():
    """VeRA's expand kernel (a shared matrix, per-token vectors before and after it, read by row) and the per-token
    input scale against einsum: tiles that do not divide the sizes, repeated rows, each scale optional; shape
    errors name the argument."""
    from peftlab.serve.kernels import row_scale, row_scaled_matmul

    g = torch.Generator().manual_seed(12)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t, k, n, slots = 37, 70, 45, 6
    z, w = torch.randn(t, k, generator=g).to(dev), torch.randn(n, k, generator=g).to(dev)
    rows = torch.randint(0, slots + 1, (t,), generator=g).to(dev)
    s_in, s_out = torch.randn(slots + 1, k, generator=g).to(dev), torch.randn(slots + 1, n, generator=g).to(dev)
    y0 = torch.randn(t, n, generator=g).to(dev)
    for a, b in [(None, None), (s_in, None), (None, s_out), (s_in, s_out)]:
        zz = z if a is None else z * a[rows]
        want = y0 + (zz @ w.T) * (1 if b is None else b[rows])
        got = y0.clone()
        row_scaled_matmul(z, w, rows, got, in_scale=a, out_scale=b, block_t=16, block_n=32, block_k=32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(row_scale(z, s_in, rows), z * s_in[rows])
    with pytest.raises(ValueError, match="out_scale"):
        row_scaled_matmul(z, w, rows, y0.clone(), out_scale=s_out[:, :-1])
    with pytest.raises(ValueError, match="w "):
        row_scaled_matmul(z, w[:, :-1], rows, y0.clone())
    with pytest.raises(ValueError, match="rows"):
        row_scale(z, s_in, rows[:-1])


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
