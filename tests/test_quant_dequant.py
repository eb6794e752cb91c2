"""4-bit dequantization without bitsandbytes' kernels: peftlab's torch form (taken inside compiled code) bit for bit
against bitsandbytes' dequantization, fused by inductor into one kernel, on CUDA against bitsandbytes' CUDA kernel; and
the eager Triton kernel (peftlab/quant/dequant_triton.py) against the torch form."""
import pytest
import torch

from models import CXX

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from peftlab.quant.bnb import dequantize_weight, is_quantized_linear  # noqa: E402

from test_quant_bnb import _quantized  # noqa: E402


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("backend", [None, "aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not CXX, reason="inductor on the CPU needs a C++ compiler"))])
def test_torch_dequantization_equals_bitsandbytes_bit_for_bit(quant_type, nested, backend):
    """The 4-bit weights as plain torch operators (taken inside compiled code) against bitsandbytes' own
    dequantization: every element equal, for each compute dtype. 96 x 128 has 192 absmax, not a whole block of
    the nested state's 256. Rows that are not whole blocks (8 x 96, 5 x 50) go against bitsandbytes' torch
    reference, as its CPU kernel gets some of them wrong (peftlab/quant/dequant.py)."""
    import bitsandbytes.functional as F
    import torch._dynamo
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as bnb_torch_reference

    from peftlab.quant.dequant import dequantize_4bit_torch

    torch._dynamo.reset()
    fn = dequantize_4bit_torch if backend is None else torch.compile(dequantize_4bit_torch, backend=backend)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in ((96, 128), (256, 2048), (8, 96), (5, 50)):
            w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).to(dtype)
            packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
            expected = F.dequantize_4bit(packed, state)
            if shape[1] % 64:
                absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
                expected = bnb_torch_reference(packed.reshape(-1), absmax.float(), state.code, 64, state.shape, dtype)
            got = fn(packed, state)
            assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
            assert torch.equal(got, expected), (dtype, shape, (got - expected).abs().max())


@pytest.mark.skipif(not CXX, reason="inductor on the CPU needs a C++ compiler")
@pytest.mark.parametrize("nested", [True, False])
def test_torch_dequantization_compiles_to_one_kernel(nested):
    """What the torch form is for: inductor fuses the unpacking, the table lookup, the nested absmax and the cast into
    one generated kernel (a stack of the two nibbles made it two kernels and a concatenation between them)."""
    import bitsandbytes.functional as F
    import torch._dynamo
    import torch._inductor.metrics as metrics

    from peftlab.quant.dequant import dequantize_4bit_torch

    packed, state = F.quantize_4bit(torch.randn(256, 2048).bfloat16(), blocksize=64, compress_statistics=nested,
                                    quant_type="nf4")
    torch._dynamo.reset()
    metrics.reset()
    out = torch.compile(dequantize_4bit_torch, backend="inductor")(packed, state)
    assert metrics.generated_kernel_count == 1 and torch.equal(out, F.dequantize_4bit(packed, state))


def test_torch_dequantization_is_taken_inside_compiled_code_only(monkeypatch):
    """``dequantize_weight`` traces the torch form while compiling (no bitsandbytes kernel in the graph) and calls
    bitsandbytes' kernels in eager code; a state it does not cover is refused by name."""
    import bitsandbytes.functional as F
    import torch._dynamo

    from peftlab.quant import bnb as qbnb
    from peftlab.quant.dequant import dequantize_4bit_torch

    from peftlab.quant.bnb import new_quantized_linear, quantize_weight

    module = new_quantized_linear(128, 16, False, "nf4", True, torch.float32)  # whole blocks: bnb's kernel is right
    quantize_weight(module, torch.randn(16, 128), "cpu")
    calls = []
    monkeypatch.setattr(qbnb, "dequantize_4bit_torch", lambda *a: calls.append("torch") or dequantize_4bit_torch(*a))
    real = F.dequantize_4bit
    monkeypatch.setattr(F, "dequantize_4bit", lambda *a, **k: calls.append("bnb") or real(*a, **k))
    eager = dequantize_weight(module)
    assert calls == ["bnb"]
    calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda: dequantize_weight(module), backend="aot_eager", fullgraph=True)()
    assert calls == ["torch"] and torch.equal(compiled, eager)
    state = module.weight.quant_state
    monkeypatch.setattr(state, "shape", torch.Size([3, 7]))
    with pytest.raises(ValueError, match=r"shape \(3, 7\), blocksize 64.*not covered"):
        dequantize_4bit_torch(module.weight.data, state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bitsandbytes' CUDA kernel and inductor's Triton")
def test_torch_dequantization_on_cuda_equals_bitsandbytes():
    """On the GPU, the inductor-compiled torch form against bitsandbytes' CUDA kernel on an 8B-shaped weight. Inductor
    may fuse the nested absmax's multiply and add into one FMA (bitsandbytes rounds twice), so an element may move by
    one bf16 step; the test allows that for at most 1 in 10,000 elements and reports the count. The eager Triton
    kernel is compiled without contraction and must be exact."""
    import bitsandbytes.functional as F
    import torch._dynamo

    from peftlab.quant.dequant import dequantize_4bit_torch
    from peftlab.quant.dequant_triton import dequantize_4bit_triton

    torch._dynamo.reset()
    fn = torch.compile(dequantize_4bit_torch, backend="inductor")
    for nested in (True, False):
        w = torch.randn(4096, 14336, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        expected, got = F.dequantize_4bit(packed, state), fn(packed, state)
        differ = (got != expected).sum().item()
        print(f"nested={nested}: {differ} of {got.numel()} elements differ")
        assert differ <= got.numel() // 10_000
        torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=0)
        kernel = dequantize_4bit_triton(packed, state)  # the eager kernel: no FMA, so exact
        print(f"nested={nested}: Triton kernel, {(kernel != expected).sum().item()} elements differ")
        assert torch.equal(kernel, expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_triton_dequantization_kernel_equals_the_torch_form(quant_type, nested, monkeypatch):
    """The eager GPU kernel (peftlab/quant/dequant_triton.py) in Triton's interpreter: float32 and float16 weights
    bit for bit the torch form's (so bitsandbytes'); bfloat16 equal to the float32 result truncated, which is how
    the interpreter converts (the GPU rounds to nearest even: its CUDA test compares with bitsandbytes exactly).
    Taken by ``dequantize_weight`` in eager code when usable."""
    import os

    import bitsandbytes.functional as F

    from peftlab.quant import bnb as qbnb
    from peftlab.quant import dequant_triton
    from peftlab.quant.dequant import dequantize_4bit_torch
    from peftlab.quant.dequant_triton import dequantize_4bit_triton, kernel_usable

    if os.environ.get("TRITON_INTERPRET") != "1" or not __import__("importlib").util.find_spec("triton"):
        pytest.skip("needs Triton and TRITON_INTERPRET=1 (conftest sets it on machines without CUDA)")
    monkeypatch.setenv("PEFTLAB_DEQUANT_KERNEL", "1")
    for shape in ((96, 128), (8, 96), (5, 50)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
        assert kernel_usable(packed)
        for dtype in (torch.float32, torch.float16):
            expected = dequantize_4bit_torch(packed, state, dtype)
            assert torch.equal(dequantize_4bit_triton(packed, state, dtype), expected)
        f32 = dequantize_4bit_torch(packed, state, torch.float32)
        truncated = (f32.view(torch.int32) & -65536).view(torch.float32).bfloat16()
        assert torch.equal(dequantize_4bit_triton(packed, state, torch.bfloat16), truncated)
    module = next(m for m in _quantized(quant_type, nested).modules() if is_quantized_linear(m))
    calls = []
    real = qbnb.dequantize_or_none
    monkeypatch.setattr(qbnb, "dequantize_or_none", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(dequantize_weight(module), dequantize_4bit_torch(module.weight.data, module.weight.quant_state))
    assert calls == [1]
    monkeypatch.setenv("PEFTLAB_DEQUANT_KERNEL", "0")
    dequantize_weight(module)
    assert calls == [1]  # off: bitsandbytes' kernels
    monkeypatch.setenv("PEFTLAB_DEQUANT_KERNEL", "1")
    monkeypatch.setattr(dequant_triton, "_FAILED", None)  # restored to None after the test
    monkeypatch.setattr(dequant_triton, "_kernel", lambda: (_ for _ in ()).throw(RuntimeError("no such option")))
    monkeypatch.setattr(dequant_triton, "_COMPILED", None)
    with pytest.warns(RuntimeWarning, match="no such option.*bitsandbytes' kernels"):
        dense = dequantize_weight(module)  # a kernel that cannot be built: bitsandbytes', once warned
    assert dense.shape == module.weight.quant_state.shape and not kernel_usable(packed)
