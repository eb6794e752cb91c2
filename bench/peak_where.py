"""Where a CUDA step's peak memory is: the tensors alive at the peak of the caching allocator's trace, grouped by
the Python lines that allocated them, and when in the run the peak came (warm-up, CUDA-graph recording, or a timed
step). For issue 14's "peak memory <= PEFT + Liger's": the 1B rows of prompt tuning and P-tuning sit at 1.04x PEFT +
Liger's although a compiled layer keeps as much per token as Liger's eager one (bench/pointwise_cpu.py); whether the
rest is the loss's chunk, a backward transient or the warm-up is what this says.

The bench worker calls it when ``PEFTLAB_BENCH_PEAK_WHERE=1`` (CUDA only): ``start()`` before the first step, ``mark()``
between steps, ``finish()`` after the last; the summary lands in the row's ``peak_where``. Allocations made inside a
CUDA-graph replay do not pass through the allocator: a graphed layer's memory shows up where its graph was recorded.

    summarize(snapshot, marks) -> {"peak_bytes", "peak_phase", "peak_frames", "live": [...]}
"""
from __future__ import annotations

from typing import Any

MAX_ENTRIES = 2_000_000
_SKIP = ("torch/utils/_contextlib.py", "torch/_tensor.py", "torch/nn/modules/module.py", "torch/autograd/",
         "torch/_dynamo/eval_frame.py", "torch/cuda/memory.py")


def start() -> int:
    """Begin recording; returns the bytes allocated before (the weights: not in the trace)."""
    import torch

    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")
    return torch.cuda.memory_allocated()


def finish(marks: list[tuple[str, int]], before: int, top: int = 25) -> dict[str, Any]:
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return {"allocated_before_gib": round(before / 2**30, 3), **summarize(snapshot, marks, top)}


def mark(marks: list[tuple[str, int]], name: str) -> None:
    """Note that the trace's events from here on belong to ``name`` (a step); reads the trace's length so far."""
    import torch

    marks.append((name, sum(len(t) for t in torch.cuda.memory._snapshot()["device_traces"])))


def _where(frames: list[dict], depth: int = 3) -> str:
    kept = [f for f in frames if not any(s in f.get("filename", "") for s in _SKIP)]
    return " <- ".join(f"{f.get('filename', '?').rsplit('site-packages/', 1)[-1]}:{f.get('line', '?')} "
                       f"{f.get('name', '?')}" for f in kept[:depth])


def summarize(snapshot: dict, marks: list[tuple[str, int]] = (), top: int = 25) -> dict[str, Any]:
    """Replay the allocator's trace (``alloc`` / ``free_completed`` events, every device in the order recorded):
    the peak of live bytes, the phase it fell in (the last mark at or before it; ``marks`` are (name, event
    count so far)), the frames of the allocation that reached it, and the live allocations at that moment grouped
    by where they were made, largest first. Memory allocated before the trace began is not counted."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    live: dict[int, dict] = {}
    total = peak = 0
    peak_index = -1
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, peak_index = total, i
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    live.clear()
    for event in events[:peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: dict[str, list[int]] = {}
    for event in live.values():
        entry = groups.setdefault(_where(event.get("frames", [])), [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    phase = "before the first mark"
    for name, count in marks:
        if count <= peak_index:
            phase = name
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {
        "peak_bytes": peak,
        "peak_gib": round(peak / 2**30, 3),
        "peak_phase": phase,
        "peak_frames": _where(events[peak_index].get("frames", []), 6) if peak_index >= 0 else None,
        "events": len(events),
        "live": [{"mib": round(b / 2**20, 1), "tensors": n, "where": w} for w, (b, n) in ranked[:top]],
        "live_other_mib": round(sum(b for _, (b, _n) in ranked[top:]) / 2**20, 1),
    }
