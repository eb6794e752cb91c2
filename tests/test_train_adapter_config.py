"""Training a config given as a PEFT ``adapter_config.json`` (``TrainArgs.adapter_config``, ``peftlab train
--adapter-config``): any registered type as written, X-LoRA with its expert folders included."""
import json

import peft
import pytest
import torch
from typer.testing import CliRunner

import peftlab
from models import batch, tiny_llama, train_tiny
from peftlab.cli import app
from peftlab.core.config import ConfigError
from test_xlora_contract import experts, xlora_config  # noqa: F401  (experts: the module-scoped fixture)


def test_a_peft_written_config_trains_as_written(tmp_path):
    peft.LoHaConfig(r=6, alpha=12, target_modules=["q_proj", "down_proj"], rank_dropout=0.0,
                    task_type="CAUSAL_LM").save_pretrained(tmp_path / "loha")
    metrics = train_tiny(tmp_path, adapter_config=str(tmp_path / "loha"), config_overrides={"module_dropout": 0.1})
    assert metrics["method"] is None and metrics["peft_type"] == "LOHA"
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["alpha"], sorted(saved["target_modules"])) == (6, 12, ["down_proj", "q_proj"])
    assert saved["module_dropout"] == 0.1  # --set still applies
    losses = [h["loss"] for h in metrics["losses"]]
    assert losses[-1] < losses[0]


def test_xlora_trains_from_its_config_file(tmp_path, experts):  # noqa: F811
    path = tmp_path / "xlora.json"
    path.write_text(xlora_config(experts).to_json())
    model = tiny_llama(0)
    metrics = train_tiny(tmp_path, model=model, adapter_config=str(path), max_steps=8)
    assert metrics["peft_type"] == "XLORA"
    losses = [h["loss"] for h in metrics["losses"]]
    assert losses[-1] < losses[0]
    model.eval()
    fresh = tiny_llama(0)
    peftlab.load_adapter(fresh, tmp_path / "run" / "adapter")
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


def test_bad_adapter_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.json not found"):
        train_tiny(tmp_path, adapter_config=str(tmp_path / "nowhere.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config: .*broken.json: invalid JSON"):
        train_tiny(tmp_path, adapter_config=str(tmp_path / "broken.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="adapter_config: .*list.json: expected a JSON object"):
        train_tiny(tmp_path, adapter_config=str(tmp_path / "list.json"))
    (tmp_path / "notype.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ConfigError, match="missing 'peft_type'"):
        train_tiny(tmp_path, adapter_config=str(tmp_path / "notype.json"))
    (tmp_path / "lora.json").write_text(peftlab.LoraConfig(r=4, target_modules=["q_proj"]).to_json())
    with pytest.raises(ConfigError, match="has no field 'no_such_field'"):
        train_tiny(tmp_path, adapter_config=str(tmp_path / "lora.json"), config_overrides={"no_such_field": 1})
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_refuses_flags_the_file_overrides(tmp_path):
    (tmp_path / "lora.json").write_text(peftlab.LoraConfig(r=4, target_modules=["q_proj"]).to_json())
    for flags in (["--method", "dora"], ["--r", "16"], ["--target-modules", "q_proj"]):
        result = CliRunner().invoke(app, ["train", "--adapter-config", str(tmp_path / "lora.json"), *flags,
                                          "--out", str(tmp_path / "out")])
        said = " ".join(result.output.split())  # the console wraps long lines
        assert result.exit_code != 0 and flags[0] in said and "would not apply" in said
    assert not (tmp_path / "out").exists()
