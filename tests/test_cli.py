"""End-to-end CLI runs on a tiny model folder: train, inspect, merge, generate, compare."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from models import save_tiny_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model_dir(root / "model")
    data = root / "data.jsonl"
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return root, str(model_dir), str(data)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_train_inspect_merge_generate(workspace):
    root, model_dir, data = workspace
    out = root / "train"
    invoke("train", "--method", "dora", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 3,
           "--batch-size", 2, "--r", 4, "--lr", 1e-3, "--eval-size", 4, "--set", "lora_dropout=0.1")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["use_dora"] is True and metrics["config"]["lora_dropout"] == 0.1
    assert len(metrics["losses"]) == 3
    info = json.loads(invoke("inspect", out / "adapter", "--json"))
    assert info["peft_type"] == "LORA" and info["r"] == 4 and info["parameters"] > 0
    merged = root / "merged"
    invoke("merge", "--model", model_dir, "--adapter", out / "adapter", "--out", merged)
    plain = AutoModelForCausalLM.from_pretrained(merged)
    adapted = AutoModelForCausalLM.from_pretrained(model_dir)
    peftlab.load_adapter(adapted, out / "adapter")
    ids = torch.randint(3, 90, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    text = invoke("generate", "--model", model_dir, "--adapter", out / "adapter", "--prompt", "hi",
                  "--max-new-tokens", 4)
    assert text is not None


def test_bad_adapter_gives_clear_cli_error(workspace, tmp_path):
    root, model_dir, _ = workspace
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "adapter folder not found" in result.output


def test_compare_writes_run_folder_with_peft_side_by_side(workspace):
    root, model_dir, data = workspace
    out = root / "compare"
    invoke("compare", "--model", model_dir, "--data", data, "--methods", "lora,ia3,tied_lora", "--out", out,
           "--max-steps", 2, "--with-peft", "--repeat", 2)
    results = json.loads((out / "results.json").read_text())
    for name in ("table.md", "chart.png", "chart.html"):
        assert (out / name).stat().st_size > 0
    assert results["seeds"] == [42, 43] and results["settings"]["max_steps"] == 2
    assert {(r["backend"], r["method"]) for r in results["runs"]} == {
        ("peftlab", "lora"), ("peftlab", "ia3"), ("peftlab", "tied_lora"), ("peft", "lora"), ("peft", "ia3")}
    assert all(r["error"] is None for r in results["runs"]), [r["error"] for r in results["runs"]]
    ours = {r["method"]: r for r in results["summary"] if r["backend"] == "peftlab"}
    assert sorted(r["rank"] for r in ours.values()) == [1, 2, 3]
    assert all(len(r["losses"]) == 2 for r in results["runs"])
    comparison = {c["method"]: c for c in results["peft_comparison"]}
    assert set(comparison) == {"lora", "ia3"}
    # same seed, data and weights-init rules: the two libraries train to the same eval loss
    for c in comparison.values():
        assert abs(c["eval_loss_rel_diff"]) < 0.01, c
    assert "eval loss" in (out / "table.md").read_text()
    # with repeats: each method's eval loss minus LoRA's of the same seed, per backend
    by_seed = {(r["backend"], r["method"], r["seed"]): r["eval_loss"] for r in results["runs"]}
    for row in results["summary"]:
        diffs = [by_seed[(row["backend"], row["method"], s)] - by_seed[(row["backend"], "lora", s)] for s in (42, 43)]
        assert row["paired_n"] == 2 and row["paired_delta_mean"] == pytest.approx(sum(diffs) / 2)
    assert "vs lora, same seeds" in (out / "table.md").read_text()


def test_params_only_reproduces_the_seed_table():
    out = invoke("compare", "--params-only", "--methods", "lora,adalora,loha,dora,hra")
    # the seed's table (HF PEFT on pythia-70m-deduped, r=8, alpha 16, query_key_value + dense)
    for count in ("147,456", "110,664", "294,912", "159,744", "49,152", "70,426,624"):
        assert count in out


def test_interrupted_compare_resumes_without_retraining(workspace, monkeypatch):
    from peftlab.compare import runner

    root, model_dir, data = workspace
    out = root / "resume"
    common = ["compare", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 2]
    invoke(*common, "--methods", "lora")
    first = json.loads((out / "results.json").read_text())["runs"][0]
    trained = []
    real_run_one = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda backend, name, *a, **k: trained.append(name) or
                        real_run_one(backend, name, *a, **k))
    invoke(*common, "--methods", "lora,ia3")
    assert trained == ["ia3"]  # lora finished in the first run and is not retrained
    again = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert again["lora"] == first and again["ia3"]["error"] is None
    invoke(*common[:-1], 3, "--methods", "lora")  # another budget: retrained
    assert trained == ["ia3", "lora"]


def test_compare_bad_input_fails_before_training(workspace, tmp_path):
    root, model_dir, data = workspace
    result = runner.invoke(app, ["compare", "--methods", "lora,nope", "--model", model_dir, "--data", data])
    assert result.exit_code == 2 and "unknown method(s) ['nope']" in result.output and "lora" in result.output
    result = runner.invoke(app, ["compare", "--model", model_dir, "--data", str(tmp_path / "none.jsonl"),
                                 "--methods", "lora", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "none.jsonl" in result.output
    assert not (tmp_path / "o" / "runs").exists()
    result = runner.invoke(app, ["compare", "--model", model_dir, "--data", str(tmp_path / "none.jsonl"),
                                 "--methods", "lora,ia3", "--out", str(tmp_path / "o"), "--jobs", "2"])
    assert result.exit_code == 2 and "none.jsonl" in result.output  # before any worker starts
    assert not (tmp_path / "o" / "runs").exists()


def test_compare_device_defaults_to_cuda_when_there_is_one(monkeypatch):
    """`compare` trains where the base model is, so the base goes to the GPU when one exists (it once stayed on
    the CPU on a GPU machine); an explicit device that is not there is a clear error before any work."""
    from peftlab.compare.runner import CompareArgs

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert CompareArgs().resolved_device().type == "cuda"
    assert CompareArgs(device="cpu").resolved_device().type == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert CompareArgs().resolved_device().type == "cpu"
    result = runner.invoke(app, ["compare", "--device", "cuda", "--methods", "lora"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    result = runner.invoke(app, ["compare", "--device", "gpu0", "--methods", "lora"])
    assert result.exit_code == 2 and "--device 'gpu0'" in result.output


def test_compare_records_device_and_dtype_and_resumes_only_on_a_match(workspace, monkeypatch):
    from peftlab.compare import runner as compare_runner

    root, model_dir, data = workspace
    out = root / "dtype"
    common = ["compare", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 1, "--methods", "lora"]
    invoke(*common)
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "checkpoint"
    trained = []
    real_run_one = compare_runner.run_one
    monkeypatch.setattr(compare_runner, "run_one", lambda backend, name, *a, **k: trained.append(name) or
                        real_run_one(backend, name, *a, **k))
    invoke(*common, "--dtype", "bfloat16")  # another dtype: not the stored run
    assert trained == ["lora"]
    assert json.loads((out / "results.json").read_text())["settings"]["dtype"] == "bfloat16"


def test_failed_method_is_kept_with_its_traceback(workspace, monkeypatch):
    """A method that raises stays in the results (error column) and leaves its traceback in its run folder, so a
    failure inside one of several compares sharing an --out (bench/gpu/compare.sh) can still be read."""
    from peftlab.compare import runner as compare_runner

    root, model_dir, data = workspace
    out = root / "failing"
    real_run_one = compare_runner.run_one

    def run_one(backend, name, *a, **k):
        if name == "ia3":
            raise RuntimeError("boom in ia3")
        return real_run_one(backend, name, *a, **k)

    monkeypatch.setattr(compare_runner, "run_one", run_one)
    invoke("compare", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 1, "--methods", "lora,ia3")
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["lora"]["error"] is None and runs["ia3"]["error"] == "RuntimeError: boom in ia3"
    text = (out / "runs" / "ia3-peftlab-42" / compare_runner.RUN_ERROR).read_text()
    assert "Traceback" in text and "boom in ia3" in text
    assert not (out / "runs" / "ia3-peftlab-42" / compare_runner.RUN_RECORD).exists()  # so a resume retrains it


def test_compare_jobs_train_in_parallel_and_equal_the_sequential_run(workspace):
    """--jobs 2: the runs are trained by two worker processes and gathered; every run's result equals the one of a
    sequential compare of the same settings, and the results say the times were taken under sharing."""
    root, model_dir, data = workspace
    common = ["compare", "--model", model_dir, "--data", data, "--max-steps", 2, "--methods", "lora,ia3,loha"]
    invoke(*common, "--out", root / "seq")
    invoke(*common, "--out", root / "par", "--jobs", 2)
    seq = {r["method"]: r for r in json.loads((root / "seq" / "results.json").read_text())["runs"]}
    par_results = json.loads((root / "par" / "results.json").read_text())
    par = {r["method"]: r for r in par_results["runs"]}
    assert par_results["jobs"] == 2 and set(par) == set(seq) == {"lora", "ia3", "loha"}
    for name in seq:
        assert par[name]["error"] is None
        assert par[name]["trainable_params"] == seq[name]["trainable_params"]
        assert par[name]["eval_loss"] == pytest.approx(seq[name]["eval_loss"], rel=1e-5)
        assert par[name]["losses"] == pytest.approx(seq[name]["losses"], rel=1e-5)
    assert "2 runs at a time" in (root / "par" / "table.md").read_text()


def test_gather_reports_unfinished_runs_with_their_error(workspace):
    """The gather after --jobs trains nothing: a run without a record is reported as not finished, with the last
    line of the traceback its worker left."""
    from peftlab.compare import runner as compare_runner

    root, model_dir, data = workspace
    out = root / "gather"
    invoke("compare", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 1, "--methods", "lora")
    failed = out / "runs" / "ia3-peftlab-42"
    failed.mkdir(parents=True)
    (failed / compare_runner.RUN_ERROR).write_text("Traceback (most recent call last):\nRuntimeError: worker boom\n")
    args = compare_runner.CompareArgs(methods=["lora", "ia3", "vera"], model=model_dir, data=data, out=str(out),
                                      overrides={"max_steps": 1})
    results = compare_runner.run_compare(args, train=False, jobs=3)
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["lora"]["error"] is None
    assert runs["ia3"]["error"] == "not finished: RuntimeError: worker boom"
    assert runs["vera"]["error"] == "not finished: did not finish"
    assert not (out / "runs" / "vera-peftlab-42").exists()  # nothing was trained
    assert "- ia3 [peftlab] seed 42: not finished: RuntimeError: worker boom" in (out / "table.md").read_text()


def test_table_says_how_each_run_shared_the_device():
    """A resumed folder can hold runs of several calls with different --jobs: the note counts them per run."""
    from peftlab.compare.report import markdown_table, summarize

    def run(method, **extra):
        return {"backend": "peftlab", "method": method, "seed": 1, "error": None, "trainable_params": 1,
                "percent_trainable": 0.1, "eval_loss": 3.0, "perplexity": 20.0, "train_time_s": 1.0,
                "tokens_per_s": 1.0, "peak_memory_mib": 1.0, **extra}

    def note(runs):
        return markdown_table({"runs": runs, "summary": summarize(runs)})

    assert "Trained" not in note([run("lora", jobs=1), run("ia3", jobs=1)])
    assert "Trained 2 runs at a time" in note([run("lora", jobs=2), run("ia3", jobs=2)])
    assert "Trained" not in note([run("lora"), run("ia3")])  # records from before runs kept it, a sequential compare
    mixed = markdown_table({"jobs": 2, "runs": (runs := [run("lora", jobs=10), run("ia3", jobs=10), run("vera", jobs=5),
                                                         run("hra")]), "summary": summarize(runs)})
    assert "2 runs 10 at a time" in mixed and "1 run 5 at a time" in mixed and "1 run at an unrecorded sharing" in mixed


def test_jobs_share_out_only_unfinished_methods(workspace):
    """A resumed --jobs compare gives its workers only the methods left to train (a finished method in a worker's
    share used to leave that worker's later methods queued while other workers sat idle)."""
    from peftlab.compare import runner as compare_runner

    root, model_dir, data = workspace
    out = root / "share"
    invoke("compare", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 1, "--methods", "lora")
    args = compare_runner.CompareArgs(methods=["ia3", "lora", "vera"], model=model_dir, data=data, out=str(out),
                                      overrides={"max_steps": 1})
    assert compare_runner.unfinished_methods(args) == ["ia3", "vera"]
    args.overrides["max_steps"] = 2  # another budget: nothing in the folder counts as finished
    assert compare_runner.unfinished_methods(args) == ["ia3", "lora", "vera"]
