"""Bad input: each case raises an error that names the problem and leaves nothing half-done."""
import json
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import peftlab
from peftlab.core import state as state_mod
from peftlab.core.adapter import AdapterLayer
from peftlab.core.config import AdapterConfig
from peftlab.core.inject import model_state
from peftlab.core.registry import register
from models import batch, randomize_adapters, tiny_llama


def saved_adapter(tmp_path, **kw):
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
    randomize_adapters(model)
    return model, peftlab.save_adapter(model, tmp_path / "adapter")


def test_unknown_config_key_is_named(tmp_path):
    _, path = saved_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_alfa"] = 8
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alfa'"):
        peftlab.load_adapter(tiny_llama(), path)


def test_unsupported_peft_option_is_named():
    with pytest.raises(peftlab.ConfigError, match="use_qalora"):
        peftlab.LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "use_qalora": True})


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_bad_rank(r):
    with pytest.raises(peftlab.ConfigError, match="r must be a positive integer"):
        peftlab.LoraConfig(r=r, target_modules=["q_proj"])


def test_a_field_set_after_building_the_config_is_checked_at_attach():
    config = peftlab.LoraConfig(r=4, target_modules=["q_proj"])
    config.r = 0
    model = tiny_llama()
    with pytest.raises(peftlab.ConfigError, match="r must be a positive integer"):
        peftlab.attach(model, config)
    assert peftlab.list_adapters(model) == []  # refused before anything was attached


def test_bad_rank_pattern():
    with pytest.raises(peftlab.ConfigError, match=r"rank_pattern\['q_proj'\]"):
        peftlab.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 0})


def test_targets_matching_nothing_list_real_names():
    model = tiny_llama()
    with pytest.raises(peftlab.ConfigError, match=r"matched no module.*q_proj"):
        peftlab.attach(model, peftlab.LoraConfig(target_modules=["query"]))
    assert not any(isinstance(m, peftlab.AdaptedModule) for m in model.modules())


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    _, path = saved_adapter(tmp_path)
    other = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(peftlab.CheckpointError, match=r"shape mismatch for 'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight'.*\(4, 32\).*\(4, 48\)"):
        peftlab.load_adapter(other, path)
    assert not model_state(other).configs
    assert not any(isinstance(m, peftlab.AdaptedModule) for m in other.modules())


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(peftlab.CheckpointError, match="adapter folder not found"):
        peftlab.load_adapter(tiny_llama(), tmp_path / "nope")
    _, path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(peftlab.CheckpointError, match="no adapter_model.safetensors"):
        peftlab.load_adapter(tiny_llama(), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(tmp_path, damage):
    _, path = saved_adapter(tmp_path)
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    model = tiny_llama()
    with pytest.raises(peftlab.CheckpointError, match="adapter_model.safetensors: not a readable safetensors"):
        peftlab.load_adapter(model, path)
    assert not model_state(model).configs


def test_pickle_weights_are_refused(tmp_path):
    _, path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(peftlab.CheckpointError, match="pickle.*safetensors only"):
        peftlab.load_adapter(tiny_llama(), path)


def test_invalid_json_config(tmp_path):
    _, path = saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(peftlab.CheckpointError, match="adapter_config.json: invalid JSON"):
        peftlab.load_adapter(tiny_llama(), path)


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    model, path = saved_adapter(tmp_path)
    tensors = state_mod.read_safetensors(path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = tensors.pop(key)
    state_mod.atomic_save_safetensors(tensors, path / "adapter_model.safetensors")
    with pytest.raises(peftlab.CheckpointError, match=r"missing \[.*q_proj.*unexpected \[.*layers\.9"):
        peftlab.load_adapter(tiny_llama(), path)


def test_adapter_name_collision():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(peftlab.AdapterError, match="already attached"):
        peftlab.attach(model, peftlab.LoraConfig(target_modules=["v_proj"]))


@dataclass
class _FrozenNoiseConfig(AdapterConfig):
    pass


class _NonMergeable(AdapterLayer):
    mergeable = False

    def __init__(self, base, config, module_name):
        super().__init__(base, config, module_name)
        self.scale = torch.nn.Parameter(torch.zeros(base.out_features))

    def adapt(self, x, out, base):
        return out + torch.tanh(out) * self.scale


register("TEST_NONMERGEABLE", _FrozenNoiseConfig, _NonMergeable)


def test_merge_of_non_mergeable_method_is_refused_and_changes_nothing():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(target_modules=["q_proj"]), name="lora")
    peftlab.attach(model, _FrozenNoiseConfig(target_modules=["v_proj"]), name="noise")
    peftlab.set_active(model, ["lora", "noise"])
    randomize_adapters(model)
    x = batch()
    before = model(x).logits
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(peftlab.AdapterError, match="'noise'.*not mergeable"):
        peftlab.merge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(model(x).logits, before)


def test_unmerge_without_merge():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(peftlab.AdapterError, match="is not merged"):
        peftlab.unmerge(model)
    peftlab.merge(model)
    with pytest.raises(peftlab.AdapterError, match="already merged"):
        peftlab.merge(model)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, path = saved_adapter(tmp_path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    randomize_adapters(model, seed=9)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(state_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        peftlab.save_adapter(model, path)
    after = {f.name: f.read_bytes() for f in path.iterdir()}
    assert after == before  # same files, same bytes, no temporary leftovers


def test_unknown_method_name():
    with pytest.raises(peftlab.ConfigError, match="unknown peft_type 'NOPE'"):
        peftlab.config_from_dict({"peft_type": "NOPE"})
