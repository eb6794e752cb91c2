"""bench/distributed.py end to end in its CPU smoke mode (so the GPU run cannot die of a typo), and its table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "distributed.py"


def test_cpu_smoke_run_writes_results_and_a_table(tmp_path):
    """The driver runs in this process (one interpreter start and torch import less); each configuration it runs is
    a subprocess of its own (one process, then torchrun with two), as in a real run."""
    out = tmp_path / "dist.json"
    _bench().main(["--shapes", "tiny", "--device", "cpu", "--nprocs", "2", "--strategies", "fsdp", "--steps", "1",
                   "--warmup", "1", "--seq", "16", "--out", str(out)])
    document = json.loads(out.read_text())
    rows = {(r["shape"], r["strategy"], r["nproc"]): r for r in document["configs"]}
    assert set(rows) == {("tiny", "none", 1), ("tiny", "fsdp", 2)}
    for key, row in rows.items():
        assert "error" not in row, row["error"]
        assert row["tokens_per_step"] == 2 * 16 * key[2] and row["tokens_per_s"] > 0
        assert row["distributed"]["world_size"] == key[2] and row["distributed"]["strategy"] == key[1]
    assert rows[("tiny", "fsdp", 2)]["distributed"]["sharded_layers"] == 2
    assert document["scaling"] == []  # no fsdp run on one process to compare with
    assert document["environment"]["torch"] and document["args"]["steps"] == 1
    readme = tmp_path / "README.md"
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", str(out), "--readme", str(readme)],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert "| tiny | fsdp | 2 | 2 x 16 |" in table and "| tiny | none | 1 | 2 x 16 |" in table
    assert table.strip().splitlines()[0] in readme.read_text()


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    import distributed as bench

    return bench


def test_scaling_efficiency_compares_the_same_shape_and_strategy():
    rows = [{"shape": "1b", "strategy": s, "nproc": n, "tokens_per_s": t}
            for s, n, t in [("none", 1, 110.0), ("ddp", 1, 100.0), ("ddp", 2, 180.0), ("fsdp", 2, 150.0)]]
    rows.append({"shape": "8b", "strategy": "ddp", "nproc": 2, "not_run": "no GPU"})
    assert _bench().scaling(rows) == [{"shape": "1b", "strategy": "ddp", "nproc": 2, "efficiency": 0.9}]


def test_more_processes_than_gpus_are_recorded_as_not_run():
    bench = _bench()
    args = bench.parse_args(["--shapes", "tiny", "--nprocs", "2", "--device", "cpu"])
    args.devices = 1  # as on a machine with one GPU
    row = bench.run_one(args, "tiny", "ddp", 2)
    assert row["not_run"] == "2 processes need 2 GPUs; 1 visible" and "tokens_per_s" not in row
    document = {"environment": {"gpu": "X", "torch": "t", "transformers": "t", "peftlab": "p", "commit": "c" * 10,
                                "peftlab_source_sha256": "s"}, "args": {"r": 16, "steps": 1, "warmup": 1},
                "configs": [row], "scaling": []}
    assert "not run: 2 processes need 2 GPUs" in bench.markdown_table(document)
