"""bench/train_step.py runs end to end on CPU (tiny shape), so a GPU run does not die of a typo."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import train_step  # noqa: E402


@pytest.mark.parametrize("impl", ["peftlab", "peftlab_fce", "peftlab_lean", "peftlab_compiled", "peftlab_compiled_addmm",
                                  "peftlab_compiled_lean", "peftlab_compiled_budget", "peftlab_compiled_pointwise",
                                  "peft"])
def test_worker_each_implementation(impl, monkeypatch):
    monkeypatch.setenv("PEFTLAB_FAST", "1")
    monkeypatch.setenv("PEFTLAB_BENCH_COMPILE", "aot_eager")  # no C compiler needed
    args = train_step.parse_args(["--worker", "--method", "dora", "--impl", impl, "--shape", "tiny", "--device", "cpu",
                                  "--steps", "2", "--warmup", "0", "--seq", "16"])
    import torch._functorch.config as functorch_config

    budget = functorch_config.activation_memory_budget
    try:
        record = train_step.run_worker(args)
    finally:  # the budget impl sets torch's global (a worker is a process of its own): not for the next tests
        functorch_config.activation_memory_budget = budget
        sys.modules["train_step_worker"]._KEEP.clear()
    assert record["trainable_params"] > 0 and len(record["step_ms_samples"]) == 2
    if impl.startswith("peftlab"):
        assert record["versions"]["peftlab_fast"] == "True"  # PEFTLAB_FAST=1 here
    if impl in ("peftlab_lean", "peftlab_compiled_lean"):
        assert record["versions"]["lean_modules"] > 0  # the tiny Llama's norms and MLPs went through the lean nodes
    if impl == "peftlab_compiled_budget":
        assert record["versions"]["activation_budget"] == 0.5
    if impl == "peftlab_compiled_pointwise":  # the layers were still wrapped after the steps
        assert record["versions"]["recompute_pointwise"] is True
    if impl.startswith("peftlab_compiled"):
        assert record["versions"]["compiled"] == "aot_eager, decoder layers"


def test_addmm_impl_forces_the_in_place_pass(monkeypatch):
    """``peftlab_compiled_addmm`` is ``peftlab_compiled`` with ops/mm_add.py's pass forced on, in its worker's
    environment only (the pass is the default; ``PEFTLAB_ADDMM_IN_PLACE=0`` turns it off); the worker records which
    it ran."""
    monkeypatch.delenv("PEFTLAB_ADDMM_IN_PLACE", raising=False)
    args = train_step.parse_args(["--shape", "tiny", "--device", "cpu"])
    assert train_step.worker_env(args, "peftlab_compiled_addmm")["PEFTLAB_ADDMM_IN_PLACE"] == "1"
    assert "PEFTLAB_ADDMM_IN_PLACE" not in train_step.worker_env(args, "peftlab_compiled")
    monkeypatch.setenv("PEFTLAB_BENCH_COMPILE", "aot_eager")
    for value, recorded in (("1", True), (None, True), ("0", False)):
        if value is None:
            monkeypatch.delenv("PEFTLAB_ADDMM_IN_PLACE", raising=False)
        else:
            monkeypatch.setenv("PEFTLAB_ADDMM_IN_PLACE", value)
        record = train_step.run_worker(train_step.parse_args(
            ["--worker", "--method", "lora", "--impl", "peftlab_compiled_addmm", "--shape", "tiny", "--device", "cpu",
             "--steps", "1", "--warmup", "0", "--seq", "16"]))
        sys.modules["train_step_worker"]._KEEP.clear()
        assert record["versions"]["addmm_in_place"] is recorded


@pytest.mark.parametrize("impl", ["frozen", "frozen_compiled"])
def test_worker_frozen_base(impl, monkeypatch):
    """The frozen-base reference (eager, or as the compiled impls run): nothing trains, gradients still flow back
    through every layer."""
    monkeypatch.setenv("PEFTLAB_BENCH_COMPILE", "aot_eager")
    args = train_step.parse_args(["--worker", "--method", impl, "--impl", impl, "--shape", "tiny", "--device",
                                  "cpu", "--steps", "1", "--warmup", "0", "--seq", "16"])
    record = train_step.run_worker(args)
    assert record["trainable_params"] == 0 and len(record["step_ms_samples"]) == 1
    assert (record["versions"].get("compiled") == "aot_eager, decoder layers") == (impl == "frozen_compiled")


def test_driver_writes_results_and_table(tmp_path, monkeypatch):
    """The driver runs in this process (its workers are subprocesses), so torch, transformers and PEFT are not
    imported once more for it; its workers get the PYTHONPATH they got when the driver was a subprocess."""
    out = tmp_path / "r.json"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    train_step.main(["--shape", "tiny", "--device", "cpu", "--methods", "tied_lora", "--impls",
                     "peftlab,unsloth,peft_liger,peft", "--steps", "2", "--warmup", "0", "--repeats", "1", "--prime",
                     "0", "--seq", "16", "--out", str(out)])
    doc = json.loads(out.read_text())
    (row,) = doc["configs"]
    assert row["impl"] == "peftlab" and len(row["step_ms_samples"]) == 2  # PEFT lacks Tied-LoRA: peftlab alone
    assert row["step_ms_p10_p90"][0] <= row["step_ms_median"] <= row["step_ms_p10_p90"][1]
    assert "impl unsloth" in doc["skipped"]  # no site folder given: skipped with the reason, not a crash
    assert "tied_lora (PEFT side)" in doc["skipped"]
    table = train_step.markdown_table(doc)
    assert "| tied_lora (variant default), all linear | peftlab |" in table and "Skipped impl unsloth" in table


def test_table_ratios_against_competitors():
    def row(method, impl, ms, gib):
        return {"method": method, "impl": impl, "label": method, "trainable_params": 1, "step_ms_median": ms,
                "tokens_per_s": 1, "peak_gib": gib}

    doc = {"environment": {"gpu": "X", "torch": "t", "transformers": "t", "peft": "p", "peftlab": "0", "commit": "c",
                           "peftlab_source_sha256": "s", "tf32_matmul": False},
           "args": {"repeats": 1, "steps": 1, "warmup": 0, "shape": "1b", "batch": 1, "seq": 1, "r": 16},
           "configs": [row("lora", "peftlab", 50.0, 6.0), row("lora", "peft", 100.0, 12.0),
                       row("lora", "unsloth", 80.0, 8.0), row("dora", "peftlab", 55.0, 6.6),
                       row("frozen", "frozen", 40.0, 5.0), row("ia3", "peftlab_compiled", 42.0, 5.0),
                       row("frozen_compiled", "frozen_compiled", 30.0, 5.0)]}
    table = train_step.markdown_table(doc)
    assert "| ia3 | peftlab_compiled | 1 | 42.00 | 1 | 5.00 |  |  |  | 1.40x |" in table  # against the compiled floor
    assert "| lora | peftlab | 1 | 50.00 | 1 | 6.00 | 0.50x / 0.50x | 0.62x / 0.75x |  | 1.25x |" in table
    assert "vs PEFT (time / mem)" in table and "vs Unsloth (time / mem)" in table and "PEFT+Liger" not in table
    assert "| lora | peftlab | 1 | 50.00 | 1 | 6.00 | 0.50x / 0.50x | 0.62x / 0.75x |  | 1.25x |" in table
    assert "| dora | peftlab | 1 | 55.00 | 1 | 6.60 |  |  | 1.10x / 1.10x | 1.38x |" in table


def test_table_ratios_in_a_merged_file_pair_rows_of_one_invocation_and_treatment():
    """A merged file holds LoRA more than once (A/B knobs, invocations of one call): each row is held against the
    LoRA of its own invocation (``call_part``), else of its pointwise-recompute setting, else the nearest."""
    def row(method, ms, gib, part, pointwise):
        return {"method": method, "impl": "peftlab_compiled", "label": f"{method} {part}", "trainable_params": 1,
                "step_ms_median": ms, "tokens_per_s": 1, "peak_gib": gib, "call_part": part,
                "versions": {"recompute_pointwise": pointwise}}

    doc = {"environment": {"gpu": "X", "torch": "t", "transformers": "t", "peft": "p", "peftlab": "0", "commit": "c",
                           "peftlab_source_sha256": "s", "tf32_matmul": False},
           "args": {"repeats": 1, "steps": 1, "warmup": 0, "shape": "1b", "batch": 1, "seq": 1, "r": 16},
           "configs": [row("dora", 66.0, 7.0, "a", True), row("lora", 60.0, 6.0, "a", True),
                       row("dora", 63.0, 8.0, "b", False), row("lora", 56.0, 7.0, "b", False),
                       row("dora", 69.0, 7.0, "c", True)]}
    table = train_step.markdown_table(doc)
    assert "| dora a | peftlab_compiled | 1 | 66.00 | 1 | 7.00 | 1.10x / 1.17x |" in table
    assert "| dora b | peftlab_compiled | 1 | 63.00 | 1 | 8.00 | 1.12x / 1.14x |" in table
    assert "| dora c | peftlab_compiled | 1 | 69.00 | 1 | 7.00 | 1.15x / 1.17x |" in table  # a's LoRA: same setting


def test_unknown_impl_is_an_error():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--impls", "peftlab,nope", "--device", "cpu"])


def test_train_overhead_proxy_runs(tmp_path, monkeypatch):
    """bench/train_overhead.py (the CPU host-time proxy) end to end, small: a method PEFT has, one it lacks, and
    the compiled layers (aot_eager here)."""
    import torch
    import train_overhead

    out = tmp_path / "overhead.json"
    monkeypatch.setenv("PEFTLAB_FAST", "1")  # what main() would set for good; the monkeypatch undoes it after
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the test process's threads alone
    monkeypatch.setattr(sys, "argv", ["train_overhead.py", "--methods", "lora,tied_lora", "--layers", "2", "--rounds",
                                      "1", "--steps", "1", "--compile", "aot_eager", "--out", str(out)])
    train_overhead.main()
    doc = json.loads(out.read_text())
    assert {"frozen base", "lora peftlab", "lora peft", "lora peftlab compiled", "tied_lora peftlab",
            "tied_lora peftlab compiled"} == set(doc["step_ms_median"])  # PEFT has no Tied-LoRA: no row, no ratio
    assert "lora peftlab" in doc["ratios"] and "tied_lora peftlab" not in doc["ratios"]


def test_sdpa_mask_impl_keeps_transformers_attention(monkeypatch):
    """``peftlab_compiled_sdpa_mask`` runs a KV prefix under transformers' sdpa (its mask), the default impl under
    ops/prefix_attention.py's ``peftlab_sdpa``; each worker records which."""
    monkeypatch.delenv("PEFTLAB_PREFIX_FLASH", raising=False)
    monkeypatch.setenv("PEFTLAB_BENCH_COMPILE", "aot_eager")
    args = train_step.parse_args(["--shape", "tiny", "--device", "cpu"])
    assert train_step.worker_env(args, "peftlab_compiled_sdpa_mask")["PEFTLAB_PREFIX_FLASH"] == "0"
    assert train_step.worker_env(args, "peftlab_compiled_prefix_fa2")["PEFTLAB_PREFIX_FLASH"] == "fa2"
    for impl, attention in (("peftlab_compiled_sdpa_mask", "sdpa"), ("peftlab_compiled", "peftlab_sdpa"),
                            ("peftlab_compiled_prefix_fa2", "peftlab_sdpa")):
        for key, value in train_step.worker_env(args, impl).items():
            if key.startswith("PEFTLAB_"):
                monkeypatch.setenv(key, value)
        record = train_step.run_worker(train_step.parse_args(
            ["--worker", "--method", "prefix_tuning", "--impl", impl, "--shape", "tiny", "--device", "cpu",
             "--steps", "1", "--warmup", "0", "--seq", "16"]))
        sys.modules["train_step_worker"]._KEEP.clear()
        monkeypatch.delenv("PEFTLAB_PREFIX_FLASH", raising=False)
        assert record["versions"]["attention"] == attention, impl
        assert record["versions"].get("prefix_attention") == (  # no flash kernel on the CPU: the knob is inert
            None if attention == "sdpa" else "sdpa causal, padded q"), impl
