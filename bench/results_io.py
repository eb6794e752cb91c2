"""What every benchmark script shares: the self-description of a results file (versions, GPU, the exact
peftlab sources), atomic writes, and the README tables generated from results files (``--table``/``--readme``)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def source_hash() -> str:
    """sha256 over peftlab/ sources: names the exact library code that ran, committed or not."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "peftlab").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "peftlab"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        return {"commit": commit, "peftlab_uncommitted": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.CalledProcessError):  # a copied tree without .git (the GPU machine)
        return {"commit": os.environ.get("PEFTLAB_COMMIT", "unknown"), "peftlab_uncommitted": "unknown"}


def environment(device: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import peftlab

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "peft": peft.__version__, "peftlab": peftlab.__version__,
        "peftlab_source_sha256": source_hash(), **git_commit(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_cpu_rows(args, shape: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """A CPU proxy's results (environment, its arguments, the model shape, its rows) to ``args.out``, atomically."""
    result = {"environment": environment("cpu"), "args": vars(args) | {"out": str(args.out)}, "shape": shape,
              "rows": rows}
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")


def write_timed_rows(args, shape: dict[str, Any], times: dict[str, list[float]]) -> None:
    """``write_cpu_rows`` for rows of step times (ms) by row name: each row's median and samples, printed too."""
    rows = []
    for name, samples in times.items():
        rows.append({"row": name, "step_ms_median": round(statistics.median(samples), 1),
                     "step_ms": [round(t, 1) for t in samples]})
        print(f"{name:42s} {statistics.median(samples):8.1f} ms")
    write_cpu_rows(args, shape, rows)


def write_readme(readme: Path, results: Path, table: str) -> None:
    """Replace the block between the markers for this results file (or append one)."""
    rel = results.resolve().relative_to(ROOT) if results.resolve().is_relative_to(ROOT) else results
    begin, end = f"<!-- table: {rel} -->", f"<!-- end table: {rel} -->"
    block = f"{begin}\n{table}\n{end}"
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


def table_command(results: str, readme: str | None, render: Callable[[dict[str, Any]], str]) -> None:
    """``--table``: print the markdown table of a results file; with ``--readme`` also write it there."""
    table = render(json.loads(Path(results).read_text()))
    print(table)
    if readme:
        write_readme(Path(readme), Path(results), table)
