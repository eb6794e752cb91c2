"""The fused LoRA / DoRA path (peftlab/ops/fast.py) against the reference path, forward and gradients.

The reference is the same adapter run with ``PEFTLAB_FAST=0`` (LoraLayer.delta / DoraLayer.adapt, plain
autograd, fp32 adapter maths); the fused path runs the adapter maths in the activation dtype, so
bf16 comparisons use bf16 tolerances.
"""
import pytest
import torch
from torch import nn

import peftlab
from devices import DEVICES
from models import batch, check_fast_path_matches_reference, tiny_gpt2, tiny_llama
from peftlab.core.adapter import AdaptedModule
from peftlab.ops import fast


def adapted_linear(use_dora, dtype, bias=True, dropout=0.0, seed=0, in_f=24, out_f=20):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(dtype)
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=use_dora,
                                             lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def run(model, x, fast_flag, monkeypatch, seed=0):
    monkeypatch.setenv("PEFTLAB_FAST", fast_flag)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout mask on both paths
    y = model(x)
    g = torch.Generator().manual_seed(5)
    (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_reference(dtype, use_dora, bias, device, monkeypatch):
    model = adapted_linear(use_dora, dtype, bias=bias).to(device)
    x = torch.randn(3, 7, 24).to(device, dtype)
    ref = run(model, x, "0", monkeypatch)
    got = run(model, x, "1", monkeypatch)
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
    torch.testing.assert_close(got[1], ref[1], **TOL[dtype])
    assert set(got[2]) == set(ref[2]) and got[2]
    for name in ref[2]:
        assert got[2][name].dtype == ref[2][name].dtype, name
        scale = ref[2][name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[2][name] / scale, ref[2][name] / scale, **TOL[dtype], msg=name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dora_shared_output_matches_reference(bias, monkeypatch):
    """PEFTLAB_DORA_SHARE_OUTPUT=1 (dm from the output y itself, not from a copy): the same forward and gradients."""
    model = adapted_linear(True, torch.float32, bias=bias)
    x = torch.randn(3, 7, 24)
    ref = run(model, x, "0", monkeypatch)
    monkeypatch.setenv("PEFTLAB_DORA_SHARE_OUTPUT", "1")
    got = run(model, x, "1", monkeypatch)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert any("magnitude" in name for name in ref[2])
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **TOL[torch.float32], msg=name)


def test_fused_path_is_taken(monkeypatch):
    """The fused node is really used (a check that could otherwise pass with the fused path off)."""
    model = adapted_linear(False, torch.float32)
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    y = model(torch.randn(2, 24, requires_grad=True))
    assert type(y.grad_fn).__name__.startswith("_LoraLinear")
    monkeypatch.setenv("PEFTLAB_FAST", "0")
    y = model(torch.randn(2, 24, requires_grad=True))
    assert not type(y.grad_fn).__name__.startswith("_LoraLinear")


def test_default_is_cuda_only(monkeypatch):
    monkeypatch.delenv("PEFTLAB_FAST", raising=False)
    assert not fast.enabled(torch.zeros(1))
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    assert fast.enabled(torch.zeros(1))


def test_lora_dropout_same_mask(monkeypatch):
    model = adapted_linear(False, torch.float32, dropout=0.3)
    model.train()
    x = torch.randn(4, 24)
    ref, got = run(model, x, "0", monkeypatch, seed=7), run(model, x, "1", monkeypatch, seed=7)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **TOL[torch.float32])


def test_trainable_base_weight_and_bias(monkeypatch):
    """Gradients of a base weight / bias that require grad (bias='all', or unfrozen by the user)."""
    model = adapted_linear(False, torch.float32)
    for p in model[0].base_layer.parameters():
        p.requires_grad_(True)
    x = torch.randn(5, 24)
    ref, got = run(model, x, "0", monkeypatch), run(model, x, "1", monkeypatch)
    assert "0.base_layer.weight" in got[2] and "0.base_layer.bias" in got[2]
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **TOL[torch.float32])


def test_dora_fused_does_not_save_product(monkeypatch):
    """DoRA's fused node keeps less for backward than plain autograd: one bf16 (tokens, out) tensor (the
    output) besides the input and the weights, instead of W0 x and an fp32 s B A x."""
    model = adapted_linear(True, torch.bfloat16, in_f=64, out_f=64)
    x = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    held = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(flag):
        monkeypatch.setenv("PEFTLAB_FAST", flag)
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in held:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return sum(seen.values())

    tokens_by_out = 256 * 64
    # a copy of y (bf16), s A x (bf16), m / n, and A, B in bf16 (cast once, in forward)
    assert saved_bytes("1") <= 2 * tokens_by_out + 2 * 256 * 4 + 64 * 4 + 2 * 4 * (64 + 64)
    assert saved_bytes("0") >= 6 * tokens_by_out


@pytest.mark.parametrize("build,use_dora", [(tiny_llama, False), (tiny_llama, True), (tiny_gpt2, False)],
                         ids=["llama-lora", "llama-dora", "gpt2-lora"])
@pytest.mark.parametrize("device", DEVICES)
def test_whole_model(build, use_dora, device, monkeypatch):
    """A tiny causal LM (Conv1D weights on GPT-2): loss and every adapter gradient agree."""
    model = build().to(device)
    targets = "all-linear"
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ids = batch().to(device)
    check_fast_path_matches_reference(model, ids, monkeypatch)
    assert any(isinstance(m, AdaptedModule) for m in model.modules())


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_under_autocast(use_dora, monkeypatch):
    """fp32 weights under bf16 autocast (the train loop on CUDA): fused, output in the autocast dtype,
    same result as the reference path under the same autocast."""
    model = adapted_linear(use_dora, torch.float32)
    x = torch.randn(6, 24)
    results = []
    for flag in ("0", "1"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(model, x, flag, monkeypatch))
        assert results[-1][0].dtype == torch.bfloat16
    (ref, got) = results
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a.float(), b.float(), **TOL[torch.bfloat16])
    for name in ref[2]:
        scale = ref[2][name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[2][name] / scale, ref[2][name] / scale, **TOL[torch.bfloat16], msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Linear" in type(model(x.requires_grad_()).grad_fn).__name__


def test_falls_back_with_two_adapters(monkeypatch):
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    model = adapted_linear(False, torch.float32)
    x = torch.randn(2, 24, requires_grad=True)
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["0"]), name="second")
    model[0].active = ["default", "second"]
    assert not type(model(x).grad_fn).__name__.startswith("_LoraLinear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_and_dora_peak_memory(monkeypatch):
    """On CUDA the fused path is the default, and DoRA's training peak is below the reference path's."""
    monkeypatch.delenv("PEFTLAB_FAST", raising=False)
    model = adapted_linear(True, torch.bfloat16, in_f=1024, out_f=4096).cuda()
    x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    assert fast.enabled(x)

    def peak(flag):
        monkeypatch.setenv("PEFTLAB_FAST", flag)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    assert peak("1") < 0.9 * peak("0")


def test_dora_norm_native_gemm():
    """The fast path's row norm (W0 A^T in W0's bf16, no fp32 copy of W0) against the dense fp32 norm."""
    from peftlab.methods.dora import dora_row_norm

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g).bfloat16()
    a, b = torch.randn(4, 96, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1
    dense = (w.float() + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora_row_norm(w, a, b, 0.7, native_gemm=True), dense, atol=1e-3, rtol=2e-3)


def test_dora_norm_rank_sums_compiled(monkeypatch):
    """The rank-r products as broadcast sums (``PEFTLAB_DORA_RANK_GEMM=0``, taken only inside a compiled graph)
    against the same norm through the two GEMMs, eagerly."""
    from peftlab.methods import dora

    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 80, generator=g).bfloat16()
    a, b = torch.randn(6, 80, generator=g) * 0.2, torch.randn(48, 6, generator=g) * 0.2
    eager = dora.dora_row_norm(w, a, b, 0.7, native_gemm=True)
    monkeypatch.setattr(dora, "_RANK_REDUCTIONS", True)
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    compiled = torch.compile(lambda *t: dora.dora_row_norm(*t, 0.7, native_gemm=True), backend=backend)(w, a, b)
    assert sum("matmul" in t or "mm" in t for t in seen) == 1, seen  # W0 A^T only
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


class _OverwritesInput(torch.autograd.Function):
    """y = x * 2, whose backward writes its gradient into the saved input (as Liger's SwiGLU does)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x.data.copy_(grad * 2)  # in place, like a Triton kernel: no version bump
        return x


def test_dora_survives_a_consumer_that_overwrites_its_input(monkeypatch):
    model = adapted_linear(True, torch.float32)
    x = torch.randn(5, 24)
    grads = []
    for flag in ("0", "1"):
        monkeypatch.setenv("PEFTLAB_FAST", flag)
        _OverwritesInput.apply(model(x)).pow(2).sum().backward()
        grads.append(model[0].adapters["default"].lora_magnitude_vector.grad.clone())
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float32])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_tensor_scaling(use_dora, monkeypatch):
    """Hot-swap keeps the scaling as a 0-d buffer: the fused path folds it into A, same results."""
    model = adapted_linear(use_dora, torch.float32)
    x = torch.randn(4, 24)
    ref = run(model, x, "1", monkeypatch)
    layer = model[0].adapters["default"]
    value = layer.scaling
    del layer.scaling
    layer.register_buffer("scaling", torch.tensor(float(value)), persistent=False)
    got = run(model, x, "1", monkeypatch)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **TOL[torch.float32])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fused_path_under_torch_compile(use_dora, monkeypatch):
    """The fused nodes trace under torch.compile (aot_eager: no C compiler needed) to the same results."""
    model = adapted_linear(use_dora, torch.float32)
    x = torch.randn(4, 24)
    ref = run(model, x, "1", monkeypatch)
    torch._dynamo.reset()
    model[0].compile(backend="aot_eager")
    got = run(model, x, "1", monkeypatch)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_t,v_t,bias", [(True, True, True), (True, True, False), (False, False, False)])
@pytest.mark.parametrize("form", ["op", "split", "in_place"])
def test_mm_add_op_eager_and_compiled_equal_plain_products(device, w_t, v_t, bias, form, monkeypatch):
    from peftlab.ops.mm_add import mm_add
    monkeypatch.delenv("PEFTLAB_MM_ADD_SPLIT", raising=False)  # split: the default while compiling
    monkeypatch.delenv("PEFTLAB_MM_ADD_OP", raising=False)
    if form == "op":
        monkeypatch.setenv("PEFTLAB_MM_ADD_OP", "1")
    elif form == "in_place":
        monkeypatch.setenv("PEFTLAB_MM_ADD_SPLIT", "0")
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(9, 6, generator=g), torch.randn(9, 3, generator=g)
    w = torch.randn(5, 6, generator=g) if w_t else torch.randn(6, 5, generator=g)
    v = torch.randn(5, 3, generator=g) if v_t else torch.randn(3, 5, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    x, u, w, v = (t.to(device) for t in (x, u, w, v))
    b = None if b is None else b.to(device)
    want = x @ (w.t() if w_t else w) + u @ (v.t() if v_t else v) + (0 if b is None else b)
    torch.testing.assert_close(mm_add(x, w, b, u, v, w_t, v_t), want)
    compiled = torch.compile(lambda *a: mm_add(*a, w_t, v_t) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, u, v), want * 2)
    # inside the traced graph it is the opaque op, or two products and an add (no in-place add that functionalisation
    # would turn into an addmm copying its input), or the in-place add when asked for
    graphs = []
    torch._dynamo.reset()
    torch.compile(lambda *a: mm_add(*a, w_t, v_t), backend=lambda gm, _: graphs.append(gm) or gm)(x, w, b, u, v)
    code = graphs[0].code
    if form == "op":
        assert "peftlab.mm_add" in code
    elif form == "in_place":
        assert "addmm_" in code and "peftlab.mm_add" not in code, code
    else:
        assert "addmm_" not in code and "peftlab.mm_add" not in code and " + " in code, code


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("a_trains", [False, True])
def test_per_rank_vector_matches_the_folded_product(device, dtype, dropout, a_trains):
    """``mid`` (VeRA's d, Tied-LoRA's u) as the node's own input gives what folding it into A gives (autograd of
    d[:, None] * A on the same node), A frozen or trained, with and without dropout."""
    torch.manual_seed(0)
    n, i, o, r = 10, 12, 9, 5
    x = torch.randn(2, n, i, device=device, dtype=dtype, requires_grad=True)
    xd = torch.nn.functional.dropout(x, 0.3) if dropout else None
    weight = torch.randn(o, i, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    a0, b0, d0 = torch.randn(r, i, device=device), torch.randn(o, r, device=device), torch.randn(r, device=device)
    gy = torch.randn(2, n, o, device=device, dtype=dtype)
    runs = []
    for folded in (True, False):
        a, b, d = (t.clone().requires_grad_(grad) for t, grad in ((a0, a_trains), (b0, True), (d0, True)))
        y = (fast.lora_linear(x, xd, weight, bias, d[:, None] * a, b, 0.7) if folded
             else fast.lora_linear(x, xd, weight, bias, a, b, 0.7, mid=d))
        grads = torch.autograd.grad(y, [x, b, d] + ([a] if a_trains else []), gy, retain_graph=dropout)
        runs.append((y, grads))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    (y_f, g_f), (y_m, g_m) = runs
    torch.testing.assert_close(y_m, y_f, **tol)
    for name, got, want in zip(("x", "b", "d", "a"), g_m, g_f):
        torch.testing.assert_close(got, want, **tol, msg=name)
