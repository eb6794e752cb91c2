"""Export: merged model folders (sharded safetensors, dtype, atomic) reload in transformers with the adapter's
logits; GGUF LoRA files read back with gguf.GGUFReader hold the adapter's update under llama.cpp's names."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.export import save_merged, write_gguf_lora
from models import batch, randomize_adapters, save_tiny_model_dir, tiny_llama, tiny_tokenizer

runner = CliRunner()


def _adapted(model_dir, config):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peftlab.attach(model, config)
    randomize_adapters(model, seed=5, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("export") / "model")


def test_sharded_merged_model_reloads_with_the_adapter_logits(model_dir, tmp_path):
    model = _adapted(model_dir, peftlab.variants()["dora"](["q_proj", "v_proj", "down_proj"], 4))
    ids = batch()
    with torch.no_grad():
        expected = model(ids).logits
    out = save_merged(model, tmp_path / "merged", tiny_tokenizer(), dtype="fp32", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert (out / "config.json").is_file() and AutoTokenizer.from_pretrained(out)("hi")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_is_applied_after_a_float32_merge(model_dir, tmp_path, dtype, torch_dtype):
    model = _adapted(model_dir, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    merged32 = {k: v.clone() for k, v in peftlab.merge_and_unload(model).state_dict().items()}
    out = save_merged(model, tmp_path / "m", dtype=dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch_dtype
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, merged32[key].to(torch_dtype)), key


def test_failed_export_leaves_the_previous_folder(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = _adapted(model_dir, peftlab.LoraConfig(r=2, target_modules=["q_proj"]))

    def broken(path, **kw):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_merged(model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and (out / "keep.txt").read_text() == "old"
    with pytest.raises(ValueError, match="unknown dtype"):
        save_merged(model, out, dtype="int4")


def test_cli_export_merged_and_merge_still_work(model_dir, tmp_path):
    model = _adapted(model_dir, peftlab.variants()["loha"](["q_proj", "v_proj"], 4))
    peftlab.save_adapter(model, tmp_path / "adapter")
    ids = batch()
    with torch.no_grad():
        expected = model(ids).logits
    for args in (["export", "merged", "--max-shard-size", "30KB", "--dtype", "fp32"], ["merge"]):
        out = tmp_path / args[0]
        result = runner.invoke(app, args + ["--adapter", str(tmp_path / "adapter"), "--out", str(out),
                                            "--model", str(model_dir)])
        assert result.exit_code == 0, result.output
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- GGUF -----------------------------------------------------------------------------------------
def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0].item()


def _rope_rows(n_rows, n_head):
    """Row order llama.cpp's converter gives q/k: within a head, rows interleave the two halves."""
    hd = n_rows // n_head
    return [h * hd + i * (hd // 2) + j for h in range(n_head) for j in range(hd // 2) for i in range(2)]


def test_gguf_lora_reads_back_with_llama_cpp_names_and_values(tmp_path):
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    model = tiny_llama()
    config = peftlab.LoraConfig(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2},
                                alpha_pattern={"down_proj": 3},
                                target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"])
    peftlab.attach(model, config)
    randomize_adapters(model, seed=2, std=0.3)
    path = write_gguf_lora(model, "default", tmp_path / "lora.gguf")
    reader = GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama" and _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora" and _field(reader, "adapter.lora.alpha") == 4.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * (4 * 2 + 1)
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "mlp.down_proj": "ffn_down"}
    for i in range(2):
        for hf_name, short in gguf_names.items():
            delta = model.get_submodule(f"model.layers.{i}.{hf_name}").adapters["default"].delta_weight().detach()
            if short == "attn_q":
                delta = delta[_rope_rows(delta.shape[0], n_head)]
            elif short == "attn_k":
                delta = delta[_rope_rows(delta.shape[0], n_kv)]
            a, b = tensors[f"blk.{i}.{short}.weight.lora_a"], tensors[f"blk.{i}.{short}.weight.lora_b"]
            assert a.shape == (4, delta.shape[1]) and b.shape == (delta.shape[0], 4)  # padded to one rank
            torch.testing.assert_close(torch.from_numpy(b @ a), delta, atol=1e-5, rtol=1e-5)
            if short in ("attn_q", "attn_k"):  # transformers' GGUF loader undoes llama.cpp's permutation
                heads = n_head if short == "attn_q" else n_kv
                undone = LlamaTensorProcessor()._reverse_permute_weights(b @ a, heads, heads)
                hf = model.get_submodule(f"model.layers.{i}.{hf_name}").adapters["default"].delta_weight().detach()
                torch.testing.assert_close(torch.from_numpy(undone), hf, atol=1e-5, rtol=1e-5)
    emb = model.get_submodule("model.embed_tokens").adapters["default"].delta_weight().detach()
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a.shape == (model.config.vocab_size, 4)
    torch.testing.assert_close(torch.from_numpy(b @ a.T), emb, atol=1e-5, rtol=1e-5)


def test_gguf_qwen2_is_not_permuted_and_f16_is_written(tmp_path):
    from gguf import GGUFReader

    from models import tiny_qwen2

    model = tiny_qwen2()
    peftlab.attach(model, peftlab.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    reader = GGUFReader(write_gguf_lora(model, "default", tmp_path / "q.gguf", outtype="f16"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert _field(reader, "general.architecture") == "qwen2"
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert a.dtype == np.float16
    delta = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].delta_weight().detach()
    torch.testing.assert_close(torch.from_numpy(b.astype(np.float32) @ a.astype(np.float32)), delta,
                               atol=2e-3, rtol=2e-2)


def test_gguf_bad_input_and_cli_conversion(model_dir, tmp_path):
    from models import tiny_gpt2

    gpt2 = tiny_gpt2()
    peftlab.attach(gpt2, peftlab.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(peftlab.AdapterError, match="supports model types"):
        write_gguf_lora(gpt2, "default", tmp_path / "x.gguf")
    model = _adapted(model_dir, peftlab.variants()["loha"](["q_proj"], 4))
    with pytest.raises(peftlab.AdapterError, match="convert it first"):
        write_gguf_lora(model, "default", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype"):
        write_gguf_lora(model, "default", tmp_path / "x.gguf", outtype="q4_0")
    assert not (tmp_path / "x.gguf").exists()
    peftlab.save_adapter(model, tmp_path / "loha")
    args = ["export", "gguf", "--adapter", str(tmp_path / "loha"), "--out", str(tmp_path / "l.gguf"),
            "--model", str(model_dir)]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "convert it first" in bad.output
    result = runner.invoke(app, args + ["--rank", "32"])
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader

    assert len(GGUFReader(tmp_path / "l.gguf").tensors) == 4
