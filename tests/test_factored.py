"""Activation-side forms of LoHa, LoKr and HRA (peftlab/ops/factored.py) against dense references, and
every weight method's fast path (activation dtype, fused low-rank node) against its reference path."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from devices import DEVICES
from models import batch, losses_and_grads_by_fast_flag, tiny_llama
from peftlab.ops.factored import hadamard_lowrank, householder_apply, householder_wy, kron_apply

D = torch.float64


def test_hadamard_lowrank_is_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    w1a, w1b = torch.randn(12, 3, generator=g, dtype=D), torch.randn(3, 10, generator=g, dtype=D)
    w2a, w2b = torch.randn(12, 5, generator=g, dtype=D), torch.randn(5, 10, generator=g, dtype=D)
    x = torch.randn(2, 4, 10, generator=g, dtype=D)
    dense = (w1a @ w1b) * (w2a @ w2b)
    torch.testing.assert_close(hadamard_lowrank(x, w1a, w1b, w2a, w2b), x @ dense.t())


@pytest.mark.parametrize("low1,low2", [(False, False), (False, True), (True, True)])
def test_kron_apply_is_the_kronecker_product(low1, low2):
    g = torch.Generator().manual_seed(1)
    a, b, c, d, r = 3, 4, 5, 6, 2

    def factor(rows, cols, low):
        if low:
            parts = torch.randn(rows, r, generator=g, dtype=D), torch.randn(r, cols, generator=g, dtype=D)
            return parts, parts[0] @ parts[1]
        full = torch.randn(rows, cols, generator=g, dtype=D)
        return full, full

    w1, dense1 = factor(a, c, low1)
    w2, dense2 = factor(b, d, low2)
    x = torch.randn(2, 3, c * d, generator=g, dtype=D)
    got = kron_apply(x, None, w2, w1) if low1 else kron_apply(x, w1, w2)
    torch.testing.assert_close(got, x @ torch.kron(dense1, dense2).t())


@pytest.mark.parametrize("series", [False, True], ids=["solve", "product_form"])
@pytest.mark.parametrize("k", [1, 4, 7, 16, 17])  # 17: past the solve-free product form, a triangular solve
def test_householder_wy_is_the_chain_of_reflections(k, series):
    g = torch.Generator().manual_seed(k)
    n = max(9, k + 2)
    u = torch.randn(n, k, generator=g, dtype=D) * 3  # not unit: the WY form normalises implicitly
    chain = torch.eye(n, dtype=D)
    for i in range(k):
        v = u[:, i:i + 1]
        chain = chain @ (torch.eye(n, dtype=D) - 2 * v @ v.t() / (v.t() @ v))
    x = torch.randn(4, n, generator=g, dtype=D)
    t = householder_wy(u, series=series)
    torch.testing.assert_close(householder_apply(x, u, t, transpose=False), x @ chain)
    torch.testing.assert_close(householder_apply(x, u, t, transpose=True), x @ chain.t())


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9, 16])
def test_householder_wy_without_solve_matches_the_solve_with_gradients(k):
    """T from the nilpotent product form (k <= 16) equals the triangular solve's, and so do the gradients that flow
    back to U through it (HRA trains U through T); more than 16 reflections are refused by the product form."""
    from peftlab.ops.factored import unit_upper_inverse

    g = torch.Generator().manual_seed(30 + k)
    u = (torch.randn(12 + k, k, generator=g, dtype=D) * 2).requires_grad_()
    weights = torch.randn(k, k, generator=g, dtype=D)

    def solved(v):
        gram = v.t() @ v
        m = torch.triu(gram, diagonal=1) + torch.diag(gram.diagonal() / 2)
        return torch.linalg.solve_triangular(m, torch.eye(k, dtype=D), upper=True)

    got, want = householder_wy(u, series=True), solved(u)
    torch.testing.assert_close(got, want)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), u)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), u)
    torch.testing.assert_close(grad_got, grad_want)
    with pytest.raises(ValueError, match="k <= 16"):
        unit_upper_inverse(torch.zeros(17, 17))


def test_householder_pairs_cancel():
    u = torch.randn(8, 1, dtype=D).repeat_interleave(2, dim=1)
    x = torch.randn(3, 8, dtype=D)
    torch.testing.assert_close(householder_apply(x, u, householder_wy(u), transpose=True), x)


CONFIGS = {
    "loha": lambda: peftlab.LoHaConfig(r=3, alpha=6, target_modules=["0"], init_weights=False),
    "lokr": lambda: peftlab.LoKrConfig(r=2, alpha=4, target_modules=["0"], init_weights=False),
    "lokr_both": lambda: peftlab.LoKrConfig(r=1, alpha=4, target_modules=["0"], init_weights=False,
                                            decompose_both=True),
    "lokr_full": lambda: peftlab.LoKrConfig(r=16, alpha=4, target_modules=["0"], init_weights=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lycoris_forward_equals_dense_update(name):
    """delta(x) from the factors equals x through delta_weight() (the dense reference used for merging)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 36))
    peftlab.attach(model, CONFIGS[name]())
    layer = model[0].adapters["default"]
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer.delta(x), F.linear(x, layer.delta_weight()), atol=1e-5, rtol=1e-5)


def test_loha_saves_no_dense_update():
    """No tensor of (out, in) size is kept for backward (nor built) by LoHa's forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96))
    peftlab.attach(model, peftlab.LoHaConfig(r=4, alpha=8, target_modules=["0"], init_weights=False))
    x = torch.randn(3, 64)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        model(x).sum()
    held = {p.numel() for p in model.parameters()}
    assert max(n for n in sizes if n not in held) < 64 * 96


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "loha": lambda: peftlab.LoHaConfig(r=4, alpha=8, target_modules=ALL, init_weights=False),
    "lokr": lambda: peftlab.LoKrConfig(r=2, alpha=4, target_modules=ALL, init_weights=False),
    "hra": lambda: peftlab.HRAConfig(r=4, target_modules=ALL, init_weights=False),
    "hra_gs": lambda: peftlab.HRAConfig(r=4, apply_GS=True, target_modules=ALL, init_weights=False),
    "oft": lambda: peftlab.OFTConfig(r=0, oft_block_size=8, target_modules=ALL, init_weights=False),
    "boft": lambda: peftlab.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=ALL,
                                       init_weights=False),
    "ia3": lambda: peftlab.IA3Config(target_modules=ALL, feedforward_modules=["down_proj"], init_ia3_weights=False),
    "vera": lambda: peftlab.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False),
    "adalora": lambda: peftlab.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=ALL),
    "tied_lora": lambda: peftlab.TiedLoraConfig(r=4, lora_alpha=8, target_modules=ALL),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_matches_reference(name, dtype, device, monkeypatch):
    """Loss and adapter gradients of a bf16 (or fp32) tiny Llama: fast path (activation dtype, fused
    low-rank node) vs reference path (adapter dtype, plain autograd)."""
    model = tiny_llama().to(device, dtype)
    peftlab.attach(model, METHODS[name]())
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.05)
    ids = batch().to(device)
    (ref_loss, ref), (loss, got) = [(lo.float(), {n: g.float() for n, g in grads.items()})
                                    for lo, grads in losses_and_grads_by_fast_flag(model, ids, monkeypatch)]
    assert ref.keys() == got.keys() and ref
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for key in ref:
        scale = ref[key].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(got[key] / scale, ref[key] / scale, atol=tol["atol"] * 5, rtol=0, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (elsewhere block_rotate is the einsum form)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_bmm_block_rotate_matches_einsum_on_cuda(dtype):
    from peftlab.ops.orthogonal import block_rotate, block_rotate_reference

    x = torch.randn(3, 37, 8 * 32, device="cuda", dtype=dtype, requires_grad=True)
    blocks = (torch.randn(8, 32, 32, device="cuda", dtype=dtype) * 0.2).requires_grad_()
    grad = torch.randn(3, 37, 8 * 32, device="cuda", dtype=dtype)
    got = [block_rotate(x, blocks), *torch.autograd.grad(block_rotate(x, blocks), (x, blocks), grad)]
    ref = [block_rotate_reference(x, blocks), *torch.autograd.grad(block_rotate_reference(x, blocks), (x, blocks), grad)]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_permute_last_and_butterfly_rotate_gradients_equal_indexing(device):
    """The gather-only permutation (backward: the inverse gather) against advanced indexing, and the butterfly
    rotation with kept inverses and skipped identity factors against the plain form (argsort each time)."""
    from peftlab.ops.orthogonal import butterfly_permutations, butterfly_rotate, permute_last

    x = torch.randn(5, 64, device=device, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(64, device=device)
    grad = torch.randn(5, 64, device=device, dtype=torch.float64)
    got = torch.autograd.grad(permute_last(x, perm, torch.argsort(perm)), x, grad)[0]
    assert torch.equal(permute_last(x, perm, torch.argsort(perm)), x[..., perm])
    assert torch.equal(got, torch.autograd.grad(x[..., perm], x, grad)[0])
    perms = butterfly_permutations(64, 8, 8, 3).to(device)
    assert torch.equal(perms[0].cpu(), torch.arange(64))  # factor 0 is never permuted (what the skip relies on)
    blocks = torch.randn(3, 8, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    permuted = tuple(not torch.equal(p.cpu(), torch.arange(64)) for p in perms)
    fast = butterfly_rotate(x, blocks, perms, torch.argsort(perms, dim=1), permuted)
    plain = butterfly_rotate(x, blocks, perms)
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(fast, (x, blocks), grad), torch.autograd.grad(plain, (x, blocks), grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("series_max", [0, 16], ids=["default_solve", "product_form"])
def test_householder_wy_traced_by_compile(monkeypatch, series_max):
    """While torch.compile traces, T comes from the triangular solve by default and from the product form (no solve
    in the captured graph) with SERIES_MAX_RANK = 16; either equals the eager solve's, gradients included."""
    import peftlab.ops.factored as factored

    monkeypatch.setattr(factored, "SERIES_MAX_RANK", series_max)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    u = (torch.randn(20, 8, generator=g, dtype=D) * 2).requires_grad_()
    compiled = torch.compile(lambda v: householder_wy(v), backend=backend, fullgraph=True)
    got = compiled(u)
    assert seen and any("solve_triangular" in target for target in seen) == (series_max == 0)
    want = householder_wy(u)
    torch.testing.assert_close(got, want)
    (grad_got,), (grad_want,) = torch.autograd.grad(got.sum(), u), torch.autograd.grad(want.sum(), u)
    torch.testing.assert_close(grad_got, grad_want)
    torch._dynamo.reset()
