"""The fused path of the dense-update methods (FourierFT, SHiRA, WaveFT: methods/_dense.py; HiRA and MiSS "bat",
whose ΔW reads W0; Super-Tuning's sparse part, its LoRA beside; GLoRA, its bias update added after; C3A, whose
reference is FFTs): one GEMM on W0 + ΔW (``fast.dense_update``) against the reference W0 x + ΔW x, loss and every
gradient, fp32 and under bf16 autocast."""
import pytest
import torch

import peftlab
from models import (batch, check_fast_path_matches_reference, losses_and_grads_by_fast_flag, randomize_adapters,
                    tiny_gpt2, tiny_llama)
from peftlab.methods.hira import HiraConfig
from peftlab.methods.supertuning import SupertuningConfig
from peftlab.ops import fast

VARIANTS = ["fourierft", "shira", "waveft", "hira", "miss_bat", "supertuning", "glora", "c3a"]


def _attached(variant, build=tiny_llama):
    model = build()
    targets = ["c_attn", "c_fc"] if build is tiny_gpt2 else ["q_proj", "v_proj", "down_proj"]
    peftlab.attach(model, peftlab.variants()[variant](targets, 4))
    randomize_adapters(model, seed=3, std=0.05)
    return model.eval()  # GPT-2's own dropout would make the two passes differ; gradients flow in eval mode too


def _count_fused(monkeypatch) -> list:
    calls = []
    real = fast.dense_update

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast, "dense_update", counted)
    return calls


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_equals_reference(variant, build, monkeypatch):
    if variant == "shira" and build is tiny_gpt2:
        pytest.skip("SHiRA adapts nn.Linear only (as PEFT)")
    model = _attached(variant, build)
    calls = _count_fused(monkeypatch)
    check_fast_path_matches_reference(model, batch(), monkeypatch)
    assert calls and all(calls)  # the fused node ran on every adapted module of the fast pass


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_under_bf16_autocast(variant, monkeypatch):
    """fp32 weights under CPU bf16 autocast (the train loop's mode on CUDA): the fused output is in the autocast
    dtype and near the reference's under the same autocast (bf16 rounding of one sum against two products)."""
    model = _attached(variant)
    ids = batch()
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("PEFTLAB_FAST", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[flag] = model(ids, labels=ids)
    assert out["1"].logits.dtype == out["0"].logits.dtype
    torch.testing.assert_close(out["1"].loss.float(), out["0"].loss.float(), atol=3e-2, rtol=1e-2)


def test_hira_dropout_in_training_keeps_the_reference_path(monkeypatch):
    """HiRA's dropout acts on the update's input only, which one GEMM on W0 + ΔW cannot do: with dropout active the
    fused node is not taken; in eval mode (dropout off) it is."""
    model = tiny_llama()
    peftlab.attach(model, HiraConfig(r=4, hira_dropout=0.1, target_modules=["q_proj"]))
    calls = _count_fused(monkeypatch)
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    model.train()(batch())
    assert calls == []
    model.eval()(batch())
    assert calls and all(calls)


def test_frod_folds_with_enough_tokens(monkeypatch):
    """FRoD builds ΔW = U M V^T only where that costs fewer multiply-adds than the per-token form (then one GEMM on
    W0 + ΔW, equal to the three per-token matmuls in loss and gradients): a call of many tokens folds, a short one
    keeps the per-token form."""
    from peftlab.methods.frod import folds

    model = _attached("frod")
    calls = _count_fused(monkeypatch)
    check_fast_path_matches_reference(model, batch(b=4, t=16), monkeypatch)  # 64 tokens: every target folds
    assert calls and all(calls)
    calls.clear()
    model(batch(b=1, t=2))  # 2 tokens (decoding-sized): PEFTLAB_FAST is still 1 from the check above
    assert calls == []
    # the 1B step (4,096 tokens): every projection folds, the down projection (in 8192 > tokens) included
    assert all(folds(4096, n_in, n_out) for n_in, n_out in ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)))
    assert not folds(1, 2048, 2048) and not folds(64, 8192, 2048)  # decoding, a short call


def test_frod_builds_its_update_in_the_activations_half_precision(monkeypatch):
    """A bf16 base with fp32 FRoD parameters (the GPU bench's setting): the fused node builds ΔW in bf16 (in the
    cheaper order of the two products) and its loss and λ gradients stay near the fp32 per-token reference's."""
    from peftlab.methods.frod import FrodLayer

    model = tiny_llama().to(torch.bfloat16)
    peftlab.attach(model, peftlab.variants()["frod"](["q_proj", "v_proj", "down_proj", "up_proj"], 4))
    randomize_adapters(model, seed=3, std=0.05)
    model.eval()
    dtypes, real = [], FrodLayer.delta_weight

    def recorded(self, dtype=None):
        out = real(self, dtype)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(FrodLayer, "delta_weight", recorded)
    (ref_loss, ref_grads), (loss, grads) = losses_and_grads_by_fast_flag(model, batch(b=4, t=16), monkeypatch)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=3e-2, rtol=1e-2)
    lambdas = [n for n in ref_grads if n.endswith("frod_lambda_l")]
    assert lambdas and ref_grads.keys() == grads.keys()
    for name in lambdas:  # bf16 products against fp32 ones: near in direction and size
        a, b = grads[name].float().flatten(), ref_grads[name].float().flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, name
        assert abs(a.norm() / b.norm() - 1) < 0.05, name


def test_supertuning_fused_keeps_the_lora_dropout(monkeypatch):
    """In training with ``lora_dropout``, Super-Tuning's fast path folds only S and runs the LoRA part on the dropped
    input: with the same seed it draws the same masks as the reference, so loss and gradients agree."""
    model = tiny_llama()
    config = SupertuningConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "down_proj"])
    peftlab.attach(model, config)
    randomize_adapters(model, seed=3, std=0.05)
    check_fast_path_matches_reference(model.train(), batch(), monkeypatch, seed=0)
    with torch.no_grad():  # the dropout was live: the same pass in eval mode differs
        assert not torch.equal(model(input_ids=batch()).logits, model.eval()(input_ids=batch()).logits)
