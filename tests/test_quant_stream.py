"""Streaming quantized load: same model as a normal load + quantize, host memory bounded by one tensor."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from peftlab.quant.bnb import dequantize_weight, is_quantized_linear, quantize_model  # noqa: E402
from peftlab.quant.stream import (FitError, check_fits, load_into, load_quantized, random_source,  # noqa: E402
                                  skeleton)


def _config(tie=False):
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tie)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param)).to(torch.bfloat16)
    # two shards, so the index path is the one exercised
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="150KB")
    return folder


def test_stream_load_equals_load_then_quantize(saved):
    assert (saved / "model.safetensors.index.json").is_file()
    streamed, stats = load_quantized(saved, "nf4", double_quant=True, device="cpu")
    normal = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    quantize_model(normal, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
    names = [n for n, m in normal.named_modules() if is_quantized_linear(m)]
    assert len(names) == 21
    for name in names:
        a, b = streamed.get_submodule(name), normal.get_submodule(name)
        assert is_quantized_linear(a)
        assert torch.equal(a.weight.data, b.weight.data), name
        assert torch.equal(dequantize_weight(a), dequantize_weight(b))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, normal.eval()(input_ids=ids).logits)
    if streamed.config.tie_word_embeddings:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    # host accounting: never more than the largest single tensor, far below the bf16 model
    bf16_bytes = sum(p.numel() * 2 for p in normal.parameters())
    largest = max(p.numel() * 2 for p in AutoModelForCausalLM.from_config(_config()).parameters())
    assert stats["peak_host_bytes"] <= largest < bf16_bytes / 4
    assert stats["bytes_read"] >= bf16_bytes * 0.99


@pytest.mark.parametrize("tie", [False, True])
def test_random_source_builds_a_runnable_quantized_model(tie):
    model = skeleton(_config(tie), "nf4", True, torch.bfloat16)
    stats = load_into(model, random_source(model, "cpu"), "cpu")
    assert stats["tensors"] == len(list(model.named_parameters()))  # named_parameters lists a tied one once
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_check_fits_names_the_need(monkeypatch):
    from peftlab.quant import stream

    info = check_fits(_config(), "nf4", True, "cpu")
    # 3 layers: 4-bit linears (+ 1-byte block scales) + bf16 embeddings, head and norms
    linears = 3 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128)
    expected = linears // 2 + linears // 64 + 2 * (2 * 128 * 64 + 7 * 64)
    assert expected <= info["need_bytes"] < expected * 1.02
    monkeypatch.setattr(stream, "_available_bytes", lambda device: info["need_bytes"])
    with pytest.raises(FitError, match=r"needs about 0\.0 GiB for its weights alone; cpu has"):
        check_fits(_config(), "nf4", True, "cpu")


def test_missing_or_unknown_tensors_are_named(saved, tmp_path):
    model = skeleton(_config(), "nf4", True, torch.bfloat16)
    with pytest.raises(Exception, match="lacks"):
        load_into(model, iter([]), "cpu")
    model = skeleton(_config(), "nf4", True, torch.bfloat16)
    with pytest.raises(Exception, match="model.nowhere"):
        load_into(model, iter([("model.nowhere.weight", lambda: torch.zeros(1))]), "cpu")
