"""bench/peak_where.py: the allocator-trace replay that says what is alive at a CUDA step's peak (synthetic traces:
the recording itself needs a GPU)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peak_where  # noqa: E402


def _alloc(addr, size, line):
    return {"action": "alloc", "addr": addr, "size": size,
            "frames": [{"filename": "/x/site-packages/torch/_tensor.py", "line": 1, "name": "skipped"},
                       {"filename": "/work/peftlab/ops/fused_ce.py", "line": line, "name": "forward"}]}


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size, "frames": []}


def test_peak_is_the_largest_live_sum_and_lists_what_was_alive():
    trace = [_alloc(1, 100, 10), _alloc(2, 50, 11), _free(1, 100),   # 150 live, then 50
             _alloc(3, 120, 12), _alloc(4, 10, 12),                 # 180: the peak (at event index 4)
             _free(3, 120), _alloc(5, 60, 13)]                       # 70, then 130
    marks = [("warm-up step 0", 0), ("timed step 0", 3), ("timed step 1", 6)]
    out = peak_where.summarize({"device_traces": [trace]}, marks)
    assert out["peak_bytes"] == 180
    assert out["peak_phase"] == "timed step 0"
    assert out["peak_frames"] == "/work/peftlab/ops/fused_ce.py:12 forward"  # torch's own frames left out
    by_where = {g["where"]: g["tensors"] for g in out["live"]}
    assert by_where == {"/work/peftlab/ops/fused_ce.py:12 forward": 2, "/work/peftlab/ops/fused_ce.py:11 forward": 1}
    assert [g["mib"] for g in out["live"]] == [round(130 / 2**20, 1), round(50 / 2**20, 1)]


def test_a_free_of_memory_allocated_before_the_trace_is_ignored():
    out = peak_where.summarize({"device_traces": [[_free(9, 500), _alloc(1, 10, 1)]]})
    assert out["peak_bytes"] == 10 and out["peak_phase"] == "before the first mark"
