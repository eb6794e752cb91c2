"""`peftlab inspect`'s vLLM report: which adapters vLLM's LoRA loading would refuse, and the fix it names."""
import pytest

import peftlab
from models import TARGETS, randomize_adapters, tiny_llama
from peftlab.convert import convert_adapter
from peftlab.inspect import describe_adapter


def _saved(tmp_path, name, config):
    model = tiny_llama()
    peftlab.attach(model, config)
    randomize_adapters(model)
    peftlab.save_adapter(model, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("name, config, problem", [
    ("lora", peftlab.LoraConfig(r=8, target_modules=TARGETS["llama"]), None),
    ("dora", peftlab.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "does not serve DoRA"),
    ("lora_bias", peftlab.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), "trained biases"),
    ("saved", peftlab.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ("pissa", peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"), "rewrote the base"),
    ("ia3", peftlab.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
     "LoRA adapters only, this is IA3"),
])
def test_vllm_report_names_each_refusal(tmp_path, name, config, problem):
    report = describe_adapter(_saved(tmp_path, name, config))["vllm"]
    assert report["loadable"] is (problem is None)
    if problem:
        assert any(problem in p for p in report["problems"]), report


def test_rank_note_and_converted_dora_loads(tmp_path):
    wide = describe_adapter(_saved(tmp_path, "r32", peftlab.LoraConfig(r=8, target_modules=["q_proj"],
                                                                      rank_pattern={"q_proj": 32})))["vllm"]
    assert wide["loadable"] and wide["max_lora_rank"] == 32 and "--max-lora-rank >= 32" in wide["note"]
    dora = _saved(tmp_path, "dora", peftlab.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "peftlab convert" in describe_adapter(dora)["vllm"]["problems"][0]
    convert_adapter(tiny_llama(), dora, tmp_path / "converted", rank=8)
    assert describe_adapter(tmp_path / "converted")["vllm"] == {"loadable": True, "problems": [], "max_lora_rank": 8,
                                                                "note": ""}
