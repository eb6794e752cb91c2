"""The scaled SwiGLU node (peftlab/ops/scaled_swiglu.py): its backward against autograd of the plain ops, the Triton
kernel against the torch backward (in the interpreter on the CPU, conftest sets TRITON_INTERPRET), and a model with
IA3 on its down projections routed through the node against the same model without it."""
import pytest
import torch

import peftlab
from peftlab.ops import scaled_swiglu as ss
from tests.devices import DEVICES
from tests.models import tiny_llama

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, grad = ((torch.randn(*shape, generator=g) * 2).to(device=device, dtype=dtype) for _ in range(3))
    scale = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device)  # fp32, as IA3's vector
    return gate, up, grad, scale


def _autograd(gate, up, grad, scale):
    """Gradients of the plain ops (the MLP's product, then the adapter's scale), by autograd in fp32."""
    leaves = [t.detach().float().requires_grad_(True) for t in (gate, up, scale)]
    ss.scaled_swiglu_reference(*leaves).backward(grad.float())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(7, 40), (2, 5, 130)])
def test_backward_reference_is_autograd_of_the_plain_ops(shape):
    gate, up, grad, scale = _inputs(shape, torch.float32)
    got = ss.scaled_swiglu_backward_reference(gate, up, grad, scale)
    for a, b in zip(got, _autograd(gate, up, grad, scale)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_node_forward_is_the_plain_ops_bit_for_bit_and_its_gradients_autograds(dtype):
    gate, up, grad, scale = _inputs((3, 6, 72), dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (gate, up, scale)]
    out = ss.scaled_swiglu(*leaves)
    assert torch.equal(out, ss.scaled_swiglu_reference(gate, up, scale))
    out.backward(grad)
    for a, b in zip([t.grad for t in leaves], _autograd(gate, up, grad, scale)):
        torch.testing.assert_close(a.float(), b.to(a.dtype).float(), **TOL[dtype])


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("PEFTLAB_SWIGLU_KERNEL", "1")  # on the CPU too, in the interpreter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 200), (2, 45, 128), (1, 9)])  # partial row and column blocks; one row
def test_kernel_matches_the_torch_backward(device, dtype, shape, kernel):
    gate, up, grad, scale = _inputs(shape, dtype, device, seed=3)
    if not ss.kernel_usable(gate):
        pytest.skip("the Triton kernel cannot run here (no Triton, or CPU without TRITON_INTERPRET=1)")
    calls = []
    real = ss._backward_op
    ss._backward_op = lambda *a: calls.append(1) or real(*a)
    try:
        got = ss.scaled_swiglu_backward(gate, up, grad, scale)
    finally:
        ss._backward_op = real
    assert calls, "the kernel did not run"
    want = ss.scaled_swiglu_backward_reference(gate, up, grad, scale)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        sums = a.dim() == 1  # the vector's gradient: sums over the rows, in another order in the kernel
        tol = dict(rtol=1e-4, atol=1e-4) if sums else TOL[torch.float32] if a.dtype == torch.float32 else TOL[dtype]
        torch.testing.assert_close(a, b, **tol)


def test_grid_covers_every_row_once():
    for rows, cols in [(1, 9), (37, 200), (4096, 8192), (4097, 128), (100000, 64)]:
        col_blocks, row_blocks, per = ss._grid(rows, cols)
        assert per % ss._BLOCK_T == 0 and row_blocks * per >= rows > (row_blocks - 1) * per
        assert col_blocks * ss._BLOCK_C >= cols


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="scale"):
        ss.scaled_swiglu(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(7))


def _ia3(model):
    peftlab.attach(model, peftlab.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"]))
    with torch.no_grad():  # away from ones, so the vectors' gradients and the scaling both matter
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _loss_and_grads(model, ids, run=None):
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_ia3_model_through_the_node_gives_the_same_loss_and_gradients(monkeypatch, compile_backend, use_kernel):
    monkeypatch.setenv("PEFTLAB_FAST", "1")  # the fast path on the CPU
    monkeypatch.setenv("PEFTLAB_SWIGLU_KERNEL", "1" if use_kernel else "0")  # the kernel in the interpreter
    if use_kernel and not ss.kernel_usable(torch.empty(0)):
        pytest.skip("the Triton kernel cannot run here (no Triton, or no TRITON_INTERPRET=1)")
    ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    model = _ia3(tiny_llama(hidden=32, intermediate=72))
    want_loss, want = _loss_and_grads(model, ids)
    seen = []
    real = ss.scaled_swiglu_backward
    monkeypatch.setattr(ss, "scaled_swiglu_backward", lambda *a: seen.append(1) or real(*a))
    with ss.scaled_swiglu_mlps(model) as changed:
        assert changed == 2
        run = model if compile_backend is None else torch.compile(model, backend=compile_backend)
        got_loss, got = _loss_and_grads(model, ids, run)
    assert len(seen) == 2, "the node's backward did not run in each MLP"
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)  # restored
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)  # the forward is the plain ops
    assert set(got) == set(want) and any("down_proj" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_other_adaptations_keep_the_plain_mlp(monkeypatch):
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    seen = []
    real = ss.scaled_swiglu
    monkeypatch.setattr(ss, "scaled_swiglu", lambda *a: seen.append(1) or real(*a))
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    lora = tiny_llama()
    peftlab.attach(lora, peftlab.LoraConfig(r=4, target_modules=["down_proj"]))
    ia3 = _ia3(tiny_llama())
    with ss.scaled_swiglu_mlps(lora) as n_lora, ss.scaled_swiglu_mlps(ia3) as n_ia3:
        assert n_lora == n_ia3 == 2
        lora(input_ids=ids)  # LoRA is no input scale
        for module in ia3.modules():
            if isinstance(module, peftlab.core.adapter.AdaptedModule):
                module.disabled = True
        ia3(input_ids=ids)  # disabled
        for module in ia3.modules():
            if isinstance(module, peftlab.core.adapter.AdaptedModule):
                module.disabled = False
        monkeypatch.setenv("PEFTLAB_FAST", "0")
        ia3(input_ids=ids)  # off the fast path
        assert not seen
        monkeypatch.setenv("PEFTLAB_FAST", "1")
        ia3(input_ids=ids)
        assert len(seen) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inductor's Triton code with the kernel)")
def test_ia3_model_compiled_by_inductor_on_cuda_matches_the_plain_mlp():
    ids = torch.randint(3, 90, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    model = _ia3(tiny_llama(hidden=64, intermediate=192)).cuda().to(torch.bfloat16)
    want_loss, want = _loss_and_grads(model, ids)
    with ss.scaled_swiglu_mlps(model) as changed:
        assert changed == 2
        got_loss, got = _loss_and_grads(model, ids, torch.compile(model, backend="inductor"))
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=5e-2, msg=name)


def test_the_trainers_steps_route_the_mlps_only_when_asked_on_the_fast_path(monkeypatch):
    model = _ia3(tiny_llama())
    monkeypatch.delenv("PEFTLAB_FAST", raising=False)
    with ss.scaled_swiglu_mlps(model, torch.device("cpu")) as changed:
        assert changed == 0 and all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    with ss.scaled_swiglu_mlps(model, torch.device("cpu")) as changed:
        assert changed == 0  # off by default: it measured slower on a GPU
    monkeypatch.setenv("PEFTLAB_SCALED_SWIGLU", "1")
    with ss.scaled_swiglu_mlps(model, torch.device("cpu")) as changed:
        assert changed == 2
