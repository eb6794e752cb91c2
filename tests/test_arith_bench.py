"""bench/arith.py runs end to end in its CPU smoke mode and its table renders from the JSON it wrote."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_arith_bench_smoke(tmp_path, capsys):
    from bench import arith

    out = tmp_path / "smoke.json"
    arith.main(["--shape", "tiny", "--device", "cpu", "--backend", "eager", "--swaps", "1", "--steps", "1",
                "--max-rank", "4", "--max-shard-size", "100KB", "--out", str(out)])
    doc = json.loads(out.read_text())
    hs = doc["results"]["hotswap"]
    assert hs["recompiles"] == 0 and hs["swaps"] == 2 and hs["max_abs_diff_compiled_vs_eager"] < 1e-4
    assert doc["results"]["export_gguf"]["tensors"] == 28
    merged = doc["results"]["export_merged"]
    assert merged["shards"] > 1 and merged["index_json"] and merged["dtype"] == "torch.bfloat16"
    capsys.readouterr()
    arith.main(["--table", str(out)])
    assert "| recompiles after swaps | 0 |" in capsys.readouterr().out
