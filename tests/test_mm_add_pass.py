"""The inductor post-grad pass that turns ``addmm(mm(u, v), x, w)`` into the in-place ``peftlab::mm_add``
(``ops/mm_add.py``): which graphs it rewrites, which it leaves, and that a compiled LoRA node still gives the
eager values and gradients with it."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import peftlab.ops.mm_add as mm_add_mod
from peftlab.ops import fast

aten = torch.ops.aten


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _rewritten(fn, *args):
    gm = make_fx(fn)(*args)
    count = mm_add_mod.addmm_in_place(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, count


def test_rewrites_an_addmm_whose_addend_is_a_product_used_once():
    g = torch.Generator().manual_seed(0)
    x, w, u, v = (torch.randn(s, generator=g) for s in ((7, 5), (5, 4), (7, 3), (3, 4)))
    gm, count = _rewritten(lambda x, w, u, v: torch.addmm(u @ v, x, w).relu(), x, w, u, v)
    assert count == 1
    targets = _targets(gm)
    assert torch.ops.peftlab.mm_add.default in targets and aten.addmm.default not in targets
    assert aten.mm.default not in targets  # the addend's product moved into the op
    torch.testing.assert_close(gm(x, w, u, v), (x @ w + u @ v).relu())


@pytest.mark.parametrize("case", ["bias", "shared_addend", "beta", "other_dtype"])
def test_leaves_addmms_it_cannot_take_in_place(case):
    g = torch.Generator().manual_seed(1)
    x, w, u, v = (torch.randn(s, generator=g) for s in ((7, 5), (5, 4), (7, 3), (3, 4)))
    bias = torch.randn(4, generator=g)
    fns = {
        "bias": lambda x, w, u, v: torch.addmm(bias, x, w),  # broadcast addend: no product
        "shared_addend": lambda x, w, u, v: (lambda p: torch.addmm(p, x, w) + p)(u @ v),  # the product read twice
        "beta": lambda x, w, u, v: torch.addmm(u @ v, x, w, beta=0.5),
        "other_dtype": lambda x, w, u, v: torch.addmm((u @ v).double(), x.double(), w.double()),
    }
    gm, count = _rewritten(fns[case], x, w, u, v)
    assert count == 0
    assert torch.ops.peftlab.mm_add.default not in _targets(gm)
    torch.testing.assert_close(gm(x, w, u, v), fns[case](x, w, u, v))


def test_inductor_options_keep_the_mode_and_the_switch(monkeypatch):
    monkeypatch.setenv("PEFTLAB_ADDMM_IN_PLACE", "1")
    options = mm_add_mod.inductor_options("reduce-overhead")
    assert options["triton.cudagraphs"] is True and "post_grad_custom_post_pass" in options
    assert options["post_grad_custom_post_pass"].uuid() == mm_add_mod.inductor_options(None)[
        "post_grad_custom_post_pass"].uuid()
    monkeypatch.delenv("PEFTLAB_ADDMM_IN_PLACE")  # on by default (measured on an H100)
    assert "post_grad_custom_post_pass" in mm_add_mod.inductor_options(None)
    monkeypatch.setenv("PEFTLAB_ADDMM_IN_PLACE", "0")
    assert mm_add_mod.inductor_options("reduce-overhead") == {"triton.cudagraphs": True}
    assert mm_add_mod.inductor_options(None) == {}


def test_compiled_lora_node_with_the_pass_matches_eager(monkeypatch):
    """The LoRA node's output feeding a product (as the value projection feeds attention): inductor fuses its two
    products into an addmm, forward and backward; the pass takes both, and the values and gradients are eager's."""
    monkeypatch.setenv("PEFTLAB_ADDMM_IN_PLACE", "1")
    seen = []
    real = mm_add_mod.addmm_in_place
    monkeypatch.setattr(mm_add_mod, "addmm_in_place", lambda graph: seen.append(real(graph)) or seen[-1])
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(10, 12, generator=g)
    x0, a0, b0 = torch.randn(2, 8, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)

    def f(x, a, b):
        y = fast.lora_linear(x, None, w, None, a, b, 0.5)
        return (y @ y.transpose(-1, -2)).sum()
    runs = []
    for fn in (f, torch.compile(f, backend="inductor", options=mm_add_mod.inductor_options(None))):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph runs no pass
            out = fn(x, a, b)
            runs.append((out, *torch.autograd.grad(out, [x, a, b])))
    assert seen and sum(seen) >= 2, seen  # the forward's sum and the input gradient's
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("on", [False, True])
def test_compiled_lora_layer_keeps_no_copying_addmm(on, monkeypatch):
    """A compiled decoder layer with LoRA on all seven linears, inductor taking its GPU-side choice between ``addmm``
    and ``mm + add`` (``is_gpu`` forced true, so the CPU shows it): without the pass, six ``addmm`` a layer (the sums
    saved for backward or read by attention and the rotary's ``cat``, and one input gradient: the 6 ``memcpy128`` a
    layer of the H100 profiles); with it, none, each one an in-place ``peftlab::mm_add``."""
    import re
    from pathlib import Path

    import torch._inductor.fx_passes.post_grad as post_grad
    import torch._inductor.graph as inductor_graph

    import peftlab
    from peftlab.train.packing import compile_model

    from models import tiny_llama

    if not hasattr(post_grad, "is_gpu"):
        pytest.skip("this torch's inductor decides addmm fusion differently")
    monkeypatch.setattr(post_grad, "is_gpu", lambda device: True)
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    if on:
        monkeypatch.delenv("PEFTLAB_ADDMM_IN_PLACE", raising=False)  # the default
    else:
        monkeypatch.setenv("PEFTLAB_ADDMM_IN_PLACE", "0")
    codes = []
    lower = inductor_graph.GraphLowering.compile_to_module

    def keep_code(self, *args, **kwargs):
        module = lower(self, *args, **kwargs)
        codes.append(Path(module.__file__).read_text())
        return module
    monkeypatch.setattr(inductor_graph.GraphLowering, "compile_to_module", keep_code)
    torch._dynamo.reset()
    model = tiny_llama(layers=1, hidden=64, intermediate=128)
    model.config.use_cache = False
    peftlab.attach(model, peftlab.variants()["lora"](
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8))
    compile_model(model, "inductor", "layers")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph is never lowered
        model(input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    code = "\n".join(codes)
    addmm = len(re.findall(r"extern_kernels\.addmm\(", code))
    in_place = len(re.findall(r"= torch\.ops\.peftlab\.mm_add\.default\(", code))
    assert (addmm, in_place) == ((0, 6) if on else (6, 0)), (addmm, in_place)
