"""LoftQ initialisation: the quantizers against bitsandbytes, the factors against a short reference of the paper's
alternation, the base it leaves, checkpoints onto a dense or a quantized base, and the trainer under --quantize."""
import json
import sys
from pathlib import Path

import pytest
import torch

import peftlab
from models import batch, tiny_llama, train_tiny
from peftlab.core.adapter import AdapterError
from peftlab.core.config import ConfigError
from peftlab.core.state import read_adapter_weights
from peftlab.quant.loftq import NF4_LEVELS, int8_round_trip, loftq_factors, nf4_round_trip

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
import bitsandbytes.functional as F  # noqa: E402

from peftlab.quant.bnb import dequantize_weight, quantize_model  # noqa: E402
from peftlab.quant.dequant import dequantize_4bit_torch  # noqa: E402


def _bnb_nf4(w):
    """bitsandbytes' NF4 quantization; dequantized by the flat-index form (its CPU kernel misreads rows that are
    not whole blocks, see peftlab/quant/dequant.py)."""
    packed, state = F.quantize_4bit(w.float().contiguous(), quant_type="nf4", blocksize=64, compress_statistics=False)
    return dequantize_4bit_torch(packed, state, torch.float32)


def test_nf4_levels_are_bitsandbytes_table():
    assert torch.equal(torch.tensor(NF4_LEVELS), F.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("shape", [(64, 64), (48, 40), (7, 30)])
def test_nf4_round_trip_equals_bitsandbytes(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w[0, :3] = 0.0  # an all-zero block edge and exact zeros
    torch.testing.assert_close(nf4_round_trip(w), _bnb_nf4(w), rtol=0, atol=0)


def test_int8_round_trip_equals_bitsandbytes():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    q, scale, _ = F.int8_vectorwise_quant(w.half())
    ref = F.int8_vectorwise_dequant(q, scale).float()
    torch.testing.assert_close(int8_round_trip(w.half().float()), ref, rtol=1e-6, atol=1e-6)


def _reference(w, rank, iters):
    """The paper's alternation as PEFT writes it (A = R, B = L, no LoRA scaling), bitsandbytes quantizing."""
    res = w.clone()
    for i in range(iters):
        q = _bnb_nf4(res)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        left, right = u @ torch.diag(s.sqrt())[:, :rank], torch.diag(s.sqrt())[:rank] @ vh
        if i + 1 == iters:
            break
        res = w - left @ right
    return q, right, left


@pytest.mark.parametrize("iters", [1, 3])
def test_factors_equal_the_reference_and_absorb_the_quantization_error(iters):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    q_ref, a_ref, b_ref = _reference(w, 4, iters)
    base, a, b = loftq_factors(w, 4, rank=4, iters=iters, scaling=1.0)
    torch.testing.assert_close(base, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(b @ a, b_ref @ a_ref, rtol=1e-4, atol=1e-6)
    base2, a2, b2 = loftq_factors(w, 4, rank=4, iters=iters, scaling=2.0)  # s B A is what is fixed
    torch.testing.assert_close(base2, base, rtol=1e-5, atol=1e-7)  # C_t differs in rounding only
    torch.testing.assert_close(2.0 * (b2 @ a2), b @ a, rtol=1e-4, atol=1e-6)
    plain = float((w - nf4_round_trip(w)).norm())
    assert float((w - base - b @ a).norm()) < 0.95 * plain


def _as_attach_computes(weight, iters):
    """loftq_factors where attaching computes them: on the GPU when there is one (the base waits on the host)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [t.cpu() for t in loftq_factors(weight.to(device), 4, rank=4, iters=iters, scaling=2.0)]


def _loftq_config(**kw):
    return peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="loftq",
                              **kw)


def test_attach_rewrites_the_base_to_its_quantized_weights():
    dense = tiny_llama(hidden=64, intermediate=128)
    original = dense.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftlab.attach(dense, _loftq_config(loftq_config={"loftq_iter": 2}))
    module = dense.model.layers[0].self_attn.q_proj
    layer = module.adapters["default"]
    base, a, b = _as_attach_computes(original, iters=2)
    assert torch.equal(module.view.weight_oi(), base)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * (b @ a))
    assert float((original - module.view.weight_oi() - layer.delta_weight().detach()).norm()) < \
        float((original - nf4_round_trip(original)).norm())
    assert peftlab.LoraConfig.from_dict(_loftq_config().to_dict()).loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


def test_quantizing_the_rewritten_base_keeps_its_codes_and_checkpoints_load_onto_it(tmp_path):
    dense = tiny_llama(hidden=64, intermediate=128)  # whole 64-blocks per row: bitsandbytes' CPU kernel reads right
    peftlab.attach(dense, _loftq_config())
    rewritten = {n: m.view.weight_oi().clone() for n, m in dense.named_modules() if hasattr(m, "adapters")}
    peftlab.save_adapter(dense, tmp_path / "loftq")
    ids = batch()
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    peftlab.delete_adapter(dense, "default")
    quantize_model(dense, "nf4", double_quant=False, compute_dtype=torch.float32,
                   skip=("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"))  # only the adapted ones
    for name, weight in rewritten.items():
        assert torch.equal(dequantize_weight(dense.get_submodule(name)).float(), weight), name
    peftlab.load_adapter(dense, tmp_path / "loftq")  # onto its quantized base: the init stands aside
    fresh = tiny_llama(hidden=64, intermediate=128)
    peftlab.load_adapter(fresh, tmp_path / "loftq")  # onto the original dense base: LoftQ runs again
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_refusals():
    with pytest.raises(ConfigError, match="set init_lora_weights='loftq'"):
        peftlab.LoraConfig(target_modules=["q_proj"], loftq_config={"loftq_bits": 4})
    with pytest.raises(ConfigError, match="loftq_bits"):
        _loftq_config(loftq_config={"loftq_bits": 2})
    with pytest.raises(ConfigError, match="unknown key"):
        _loftq_config(loftq_config={"bits": 4})
    with pytest.raises(ConfigError, match="loftq_iter"):
        _loftq_config(loftq_config={"loftq_iter": 0})
    q = quantize_model(tiny_llama(hidden=64, intermediate=128), "nf4", compute_dtype=torch.float32)
    with pytest.raises(AdapterError, match="q_proj.*already quantized"):
        peftlab.attach(q, _loftq_config())
    with pytest.raises(AdapterError, match="rank 40 exceeds"):
        peftlab.attach(tiny_llama(), peftlab.LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="loftq"))


def test_trainer_initialises_on_the_dense_base_then_quantizes(tmp_path):
    model = tiny_llama(hidden=64, intermediate=128)
    original = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    overrides = {"init_lora_weights": "loftq", "lora_alpha": 8}
    train_tiny(tmp_path, "loftq", model=model, quantize="nf4", device="cpu", max_steps=1, lr=1e-9, r=4,
               target_modules=["q_proj", "down_proj"], config_overrides=overrides)
    module = model.model.layers[1].mlp.down_proj
    base, a, b = _as_attach_computes(original, iters=1)
    # the base was cast to bfloat16 before quantizing: the same codes, the absmax rounded to bfloat16
    torch.testing.assert_close(dequantize_weight(module.base_layer).float(), base, rtol=1e-2, atol=1e-3)
    assert torch.equal(nf4_round_trip(dequantize_weight(module.base_layer).float()) != 0, base != 0)
    saved = read_adapter_weights(tmp_path / "loftq" / "adapter")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    torch.testing.assert_close(saved[key], a)  # lr 1e-9: the saved adapter is LoftQ's start
    with pytest.raises(ConfigError, match="leaves nf4 codes in the base, but quantize='int8'"):
        train_tiny(tmp_path, "bad", model=tiny_llama(), quantize="int8", device="cpu",
                   config_overrides={"init_lora_weights": "loftq"})


def test_loftq_bench_smoke(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import loftq as bench_loftq

    out = tmp_path / "loftq.json"
    bench_loftq.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    errors = {(r["init"], r.get("loftq_iter")): r["weight_rel_error"] for r in rows[1:]}
    assert errors[("loftq", 1)] < errors[("qlora", None)] and errors[("loftq", 2)] < errors[("loftq", 1)]
    bench_loftq.main(["--table", str(out)])
    assert "| loftq | 4 | 2 |" in capsys.readouterr().out


def test_dora_with_loftq_starts_where_lora_with_loftq_does():
    ids = batch()
    outputs = []
    for use_dora in (False, True):
        model = tiny_llama(hidden=64, intermediate=128)
        peftlab.attach(model, _loftq_config(use_dora=use_dora))
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
