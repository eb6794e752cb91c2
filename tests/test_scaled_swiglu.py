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


VECS = {"down": (False, False), "down+gate": (True, False), "down+up": (False, True), "all": (True, True)}


def _inputs(shape, dtype, device="cpu", seed=0, vecs=(False, False)):
    """gate, up, grad, then the vectors (fp32, as IA3's): the down input scale and the gate / up output scales
    (None where ``vecs`` says absent)."""
    g = torch.Generator().manual_seed(seed)
    gate, up, grad = ((torch.randn(*shape, generator=g) * 2).to(device=device, dtype=dtype) for _ in range(3))
    scale, a, b = ((1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device) for _ in range(3))
    return gate, up, grad, scale, a if vecs[0] else None, b if vecs[1] else None


def _autograd(gate, up, grad, scale, gate_scale=None, up_scale=None):
    """Gradients of the plain ops (the projections' output scales, the MLP's product, then the down projection's
    input scale), by autograd in fp32; the vectors and the scaled gate and up rounded to the inputs' dtype as the
    forward rounds them (straight through: an fp32 forward otherwise)."""
    leaves = [None if t is None else t.detach().float().requires_grad_(True)
              for t in (gate, up, scale, gate_scale, up_scale)]
    g, u, s, a, b = leaves

    def rounded(t):
        return t + (t.to(gate.dtype).float() - t).detach()

    def times(t, v):
        return t if v is None else rounded(t * rounded(v))

    ss.scaled_swiglu_reference(times(g, a), times(u, b), rounded(s)).backward(grad.float())
    return [None if t is None else t.grad for t in leaves]


def _close(got, want, dtype):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            sums = a.dim() == 1  # a vector's gradient: sums over the rows, in another order
            tol = dict(rtol=1e-4, atol=1e-4) if sums else TOL[dtype]
            torch.testing.assert_close(a.float(), b.to(a.dtype).float(), **tol)


@pytest.mark.parametrize("vecs", VECS.values(), ids=VECS.keys())
@pytest.mark.parametrize("shape", [(7, 40), (2, 5, 130)])
def test_backward_reference_is_autograd_of_the_plain_ops(shape, vecs):
    gate, up, grad, *vs = _inputs(shape, torch.float32, vecs=vecs)
    got = ss.scaled_swiglu_backward_reference(gate, up, grad, *vs)
    _close(got, _autograd(gate, up, grad, *vs), torch.float32)


@pytest.mark.parametrize("vecs", VECS.values(), ids=VECS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_node_forward_is_the_plain_ops_bit_for_bit_and_its_gradients_autograds(dtype, vecs):
    gate, up, grad, *vs = _inputs((3, 6, 72), dtype, vecs=vecs)
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (gate, up, *vs)]
    out = ss.scaled_swiglu(*leaves)
    assert torch.equal(out, ss.scaled_swiglu_reference(gate, up, *vs))
    out.backward(grad)
    _close([None if t is None else t.grad for t in leaves], _autograd(gate, up, grad, *vs), dtype)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("PEFTLAB_SWIGLU_KERNEL", "1")  # on the CPU too, in the interpreter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vecs", VECS.values(), ids=VECS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 200), (2, 45, 128), (1, 9)])  # partial row and column blocks; one row
def test_kernel_matches_the_torch_backward(device, dtype, shape, vecs, kernel):
    gate, up, grad, *vs = _inputs(shape, dtype, device, seed=3, vecs=vecs)
    if device == "cpu":  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): vectors whose
        # products round nowhere (powers of two), so only the stored results' rounding differs
        vs = [None if v is None else 2.0 ** torch.randint(-1, 2, v.shape).float() for v in vs]
    if not ss.kernel_usable(gate):
        pytest.skip("the Triton kernel cannot run here (no Triton, or CPU without TRITON_INTERPRET=1)")
    calls = []
    real = ss._backward_op
    ss._backward_op = lambda *a: calls.append(1) or real(*a)
    try:
        got = ss.scaled_swiglu_backward(gate, up, grad, *vs)
    finally:
        ss._backward_op = real
    assert calls, "the kernel did not run"
    want = ss.scaled_swiglu_backward_reference(gate, up, grad, *vs)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or (a.dtype, a.shape) == (b.dtype, b.shape))
    _close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [{"EACH": True}, {"BLOCK_T": 16, "BLOCK_C": 64, "num_warps": 4, "programs": 8},
                                    {"EACH": True, "BLOCK_T": 64, "BLOCK_C": 256, "programs": 4}],
                         ids=["sums_each_step", "small_tiles_few_programs", "sums_each_step_large_tiles"])
def test_kernel_launch_choices_match_the_torch_backward(device, config, kernel, monkeypatch):
    """The launch choices bench/swiglu_bwd.py times (CONFIG) compute the same backward: tiles, warps, programs (a
    program walking several row blocks) and the column sums reduced at each step or once."""
    for key, value in config.items():
        monkeypatch.setitem(ss.CONFIG, key, value)
    gate, up, grad, *vs = _inputs((3, 37, 200), torch.float32, device, seed=5, vecs=VECS["all"])
    if not ss.kernel_usable(gate):
        pytest.skip("the Triton kernel cannot run here (no Triton, or CPU without TRITON_INTERPRET=1)")
    got = ss.scaled_swiglu_backward(gate, up, grad, *vs)
    _close(got, ss.scaled_swiglu_backward_reference(gate, up, grad, *vs), torch.float32)


def test_grid_covers_every_row_once():
    for rows, cols in [(1, 9), (37, 200), (4096, 8192), (4097, 128), (100000, 64)]:
        col_blocks, row_blocks, per = ss._grid(rows, cols)
        assert per % ss.CONFIG["BLOCK_T"] == 0 and row_blocks * per >= rows > (row_blocks - 1) * per
        assert col_blocks * ss.CONFIG["BLOCK_C"] >= cols


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="scale"):
        ss.scaled_swiglu(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="up_scale"):
        ss.scaled_swiglu(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(8), None, torch.ones(9))
    with pytest.raises(ValueError, match="one shape"):
        ss.scaled_swiglu(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8))


IA3_TARGETS = {"kv_down": ["k_proj", "v_proj", "down_proj"],  # PEFT's default for Llama: the node's down vector only
               "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _ia3(model, targets="kv_down"):
    peftlab.attach(model, peftlab.IA3Config(target_modules=IA3_TARGETS[targets], feedforward_modules=["down_proj"]))
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


@pytest.mark.parametrize("targets", IA3_TARGETS)
@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_ia3_model_through_the_node_gives_the_same_loss_and_gradients(monkeypatch, compile_backend, use_kernel,
                                                                       targets):
    monkeypatch.setenv("PEFTLAB_FAST", "1")  # the fast path on the CPU
    monkeypatch.setenv("PEFTLAB_SWIGLU_KERNEL", "1" if use_kernel else "0")  # the kernel in the interpreter
    if use_kernel and not ss.kernel_usable(torch.empty(0)):
        pytest.skip("the Triton kernel cannot run here (no Triton, or no TRITON_INTERPRET=1)")
    ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    model = _ia3(tiny_llama(hidden=32, intermediate=72), targets)
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
        assert (n_lora, n_ia3) == (0, 2)  # LoRA is no input scale: not routed
        for layer in lora.model.layers:  # routed by hand: the call-time check keeps the plain MLP
            layer.mlp.forward = ss._mlp_forward(layer.mlp)
        lora(input_ids=ids)
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


@torch.library.custom_op("peftlab_test::opaque_swiglu_backward", mutates_args=())
def _opaque_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                     gate_scale: torch.Tensor, up_scale: torch.Tensor, has_gate_scale: bool, has_up_scale: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel op's contract by the torch reference, opaque to the partitioner as the Triton op is on CUDA."""
    dg, du, ds, da, db = ss.scaled_swiglu_backward_reference(
        gate, up, grad, scale, gate_scale if has_gate_scale else None, up_scale if has_up_scale else None)
    return dg, du, torch.stack([ds, ds if da is None else da, ds if db is None else db])


@_opaque_backward.register_fake
def _(gate, up, grad, scale, gate_scale, up_scale, has_gate_scale, has_up_scale):
    return torch.empty_like(gate), torch.empty_like(up), gate.new_empty((3, gate.shape[-1]), dtype=torch.float32)


def _kept_bytes(model, ids, run):
    """Bytes of the distinct activations one forward keeps for backward (parameters excluded)."""
    owned = {t.untyped_storage().data_ptr() for t in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(kept.values())


@pytest.mark.parametrize("targets", IA3_TARGETS)
def test_the_node_keeps_no_more_than_the_plain_mlp_when_compiled(monkeypatch, targets):
    """The first form of the node kept the scaled gate and up besides the raw projections when IA3 also scaled
    them (+2 (tokens, intermediate) tensors a layer, measured +2.1 GiB on a GPU); an opaque backward op (as the
    Triton op is) must leave the partitioner nothing more to keep than the plain MLP."""
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    monkeypatch.setattr(ss, "kernel_usable", lambda x: True)
    monkeypatch.setattr(ss, "_backward_op", _opaque_backward)
    ids = torch.randint(3, 90, (1, 64), generator=torch.Generator().manual_seed(2))
    model = _ia3(tiny_llama(hidden=32, intermediate=256), targets)
    torch._dynamo.reset()
    plain = _kept_bytes(model, ids, torch.compile(model, backend="aot_eager"))
    with ss.scaled_swiglu_mlps(model) as changed:
        assert changed == 2
        torch._dynamo.reset()
        node = _kept_bytes(model, ids, torch.compile(model, backend="aot_eager"))
    assert node <= plain, (node, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inductor's Triton code with the kernel)")
@pytest.mark.parametrize("targets", IA3_TARGETS)
def test_ia3_model_compiled_by_inductor_on_cuda_matches_the_plain_mlp(targets):
    ids = torch.randint(3, 90, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    model = _ia3(tiny_llama(hidden=64, intermediate=192), targets).cuda().to(torch.bfloat16)
    want_loss, want = _loss_and_grads(model, ids)
    with ss.scaled_swiglu_mlps(model) as changed:
        assert changed == 2
        got_loss, got = _loss_and_grads(model, ids, torch.compile(model, backend="inductor"))
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=5e-2, msg=name)


def test_the_trainers_steps_route_the_mlps_on_the_fast_path_unless_turned_off(monkeypatch):
    model = _ia3(tiny_llama())
    monkeypatch.delenv("PEFTLAB_FAST", raising=False)
    with ss.scaled_swiglu_mlps(model, torch.device("cpu")) as changed:
        assert changed == 0 and all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    with ss.scaled_swiglu_mlps(model, torch.device("cpu")) as changed:
        assert changed == 2  # on by default on the fast path
    monkeypatch.setenv("PEFTLAB_SCALED_SWIGLU", "0")
    with ss.scaled_swiglu_mlps(model, torch.device("cpu")) as changed:
        assert changed == 0
