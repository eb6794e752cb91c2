"""bench/serve.py in its CPU smoke mode: every scenario runs, the JSON describes itself, the table renders."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


def test_serve_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.json"
    bench.main(["--smoke", "--cuda-graphs", "--out", str(out)])
    doc = json.loads(out.read_text())
    labels = [s["scenario"] for s in doc["scenarios"]]
    assert labels[0] == "base model" and any("mixed methods" in x for x in labels) and any("Zipf" in x for x in labels)
    assert all(s["n_errors"] == 0 and s["tokens"] == s["requests"] * doc["args"]["new"] for s in doc["scenarios"])
    assert doc["agreement"]["identical"] == doc["agreement"]["requests"]  # fp32 CPU: batched == alone
    assert doc["cold_load"]["disk_to_gpu_ms_median"] > 0 and "mixed_tok_s" in doc["peft"]
    assert doc["cold_load_before_graphs"]["cpu_to_gpu_ms_median"] > 0  # also measured before the graph rows
    assert doc["environment"]["torch"] and doc["args"]["smoke"]
    graph_rows = [x for x in labels if x.endswith(", CUDA graphs")]  # on the CPU: the fixed-shape steps, eager
    # base, 1 adapter, the two mixed batches and MoLoRA / bottleneck / LLaMA-Adapter alone (no 100-adapter row)
    assert len(graph_rows) == 7 and doc["graphs"]["graph_steps"] > 0 and doc["graphs"]["captures"] == 0
    served = {s["scenario"]: s for s in doc["scenarios"]}
    assert all(served[f"1 adapter, {name}{graphs}"]["distinct_adapters"] == 1
               for name in ("molora", "bottleneck", "llama_adapter") for graphs in ("", ", CUDA graphs"))
    assert served[bench.INPUT_SIDE_LABEL]["distinct_adapters"] == 4
    assert len(doc["kernels"]) == 6 and all(k["torch_us"] > 0 for k in doc["kernels"])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    bench.main(["--table", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert "| base model |" in text and "HF PEFT 2 adapters mixed" in text and "<!-- table:" in text
    assert "grouped LoRA product" in text and "measured before the graph rows" in text


def test_serve_profile_smoke(tmp_path):
    """bench/serve_profile.py on the CPU smoke shape: every scenario's steps are timed by kind (eager with prefill,
    fixed-shape decode) and the JSON is written."""
    import sys

    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_serve_profile", BENCH.parent / "serve_profile.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    out = tmp_path / "profile.json"
    prof.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert len(doc["scenarios"]) == 6 and "1 adapter, molora" in doc["scenarios"]  # + MoLoRA, bottleneck alone
    for s in doc["scenarios"].values():
        steps = s["steps"]
        assert steps["decode, fixed-shape step"]["count"] > 0 and steps["eager (prefill in it)"]["count"] > 0
        assert s["profile"]["decode_steps"] > 0
