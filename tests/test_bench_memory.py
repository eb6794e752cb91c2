"""bench/memory.py runs end to end on CPU (tiny shapes) and its table comes from the JSON it wrote."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("galore_torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory  # noqa: E402


def test_smoke_run_writes_self_describing_json_and_a_table(tmp_path):
    out = tmp_path / "memory.json"
    memory.main(["--smoke", "--settings", "8b-qlora-b1,8b-qlora-b4-offload-embed-keep2,1b-lora-ckpt-offload,"
                 "1b-galore-r128,galore-curve", "--steps", "1", "--warmup", "0", "--out", str(out)])
    document = json.loads(out.read_text())
    assert document["smoke"] and document["environment"]["torch"]
    rows = {(r["setting"], r["impl"]): r for r in document["results"]}
    assert set(rows) == {("8b-qlora-b1", "peftlab"), ("8b-qlora-b1", "peft"), ("8b-qlora-b1", "unsloth"),
                         ("8b-qlora-b4-offload-embed-keep2", "peftlab"),
                         ("1b-lora-ckpt-offload", "peftlab"), ("1b-lora-ckpt-offload", "unsloth"),
                         ("1b-galore-r128", "peftlab"), ("1b-galore-r128", "adamw"),
                         ("galore-curve", "peftlab"), ("galore-curve", "adamw"), ("galore-curve", "adamw_galore_lrs")}
    for key, row in rows.items():
        if key[1] == "unsloth":
            assert "needs a CUDA GPU" in row["error"]
        elif key[0] == "galore-curve":  # both optimizers saw the same batches from the same init
            assert "error" not in row and len(row["losses"]) == 3, row
        else:
            assert "error" not in row and row["step_ms"] > 0 and row["final_loss"] > 0, row
    row = rows[("8b-qlora-b4-offload-embed-keep2", "peftlab")]
    assert row["embed_offload"] is True and row["ckpt_keep"] == 2
    curve = [rows[("galore-curve", i)]["losses"] for i in ("peftlab", "adamw", "adamw_galore_lrs")]
    assert curve[0][0] == curve[1][0] == curve[2][0]  # the first loss is before any update
    assert curve[1][1] != curve[2][1]  # the two AdamW runs differ in their rates
    # both QLoRA sides train the same adapter (r16 on every linear layer)
    assert rows[("8b-qlora-b1", "peftlab")]["trainable_params"] == rows[("8b-qlora-b1", "peft")]["trainable_params"]
    table = subprocess.run([sys.executable, memory.__file__, "--table", str(out)], capture_output=True, text=True,
                           check=True).stdout
    assert "| 8b-qlora-b1 |" in table and "peft: " in table and "optimizer state" in table
    assert "adamw: final loss" in table


def test_child_failures_are_recorded_not_fatal():
    class Proc:
        stdout = ""
        stderr = "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"

    assert memory._parse_child(Proc(), "70b-qlora-b1", "peftlab") == {
        "setting": "70b-qlora-b1", "impl": "peftlab", "error": "OOM"}
    with pytest.raises(SystemExit, match="unknown setting"):
        memory.main(["--smoke", "--settings", "9b-nothing", "--out", "/dev/null"])


def test_table_keeps_one_row_per_recorded_variant_of_a_setting():
    """Rows of one setting that differ in their recorded options (the joint recompute on and off, say) get a row
    each, labelled by what tells them apart, with the ratios to the same peers; a lone record keeps a plain row."""
    from memory_table import markdown_table

    env = {"gpu": "GPU", "torch": "t", "transformers": "tf", "peft": "p", "commit": "c"}
    rows = [{"setting": "1b-lora-ckpt-offload", "impl": "unsloth", "step_ms": 100.0, "peak_gib": 3.0},
            {"setting": "1b-lora-ckpt-offload", "impl": "peftlab", "step_ms": 80.0, "peak_gib": 3.0, "ckpt_joint": True},
            {"setting": "1b-lora-ckpt-offload", "impl": "peftlab", "step_ms": 90.0, "peak_gib": 2.7, "ckpt_joint": False},
            {"setting": "1b-lora-ckpt-on", "impl": "peftlab", "step_ms": 70.0, "peak_gib": 3.2, "ckpt_joint": True}]
    table = markdown_table({"environment": env, "results": rows})
    assert "| 1b-lora-ckpt-offload (ckpt_joint=True) | 80.0 / 3.00 | 100.0 / 3.00 | unsloth: 0.80x time" in table
    assert "| 1b-lora-ckpt-offload (ckpt_joint=False) | 90.0 / 2.70 | 100.0 / 3.00 | unsloth: 0.90x time" in table
    assert "| 1b-lora-ckpt-on | 70.0 / 3.20 |" in table
