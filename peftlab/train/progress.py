"""Progress and run facts for the training loop: a rich progress bar / log lines, peak memory, versions."""
from __future__ import annotations

import platform
import sys

import torch


class Reporter:
    """A rich progress bar (loss, lr, tokens/s, ETA) on a terminal, and a log line every ``log_every`` steps."""

    def __init__(self, total: int, done: int, enabled: bool, log_every: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.log_every, self.total = log_every, total
        self.progress = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> "Reporter":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def wants_log(self, step: int) -> bool:
        return bool(self.log_every) and (step % self.log_every == 0 or step == self.total)

    def step(self, record: dict, tokens_per_s: float) -> None:
        loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
        info = f"loss {loss}  lr {record['lr']:.2e}  {tokens_per_s:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], info=info)
        if self.wants_log(record["step"]):
            stats = "".join(f"  {name} {stat}" for name, stat in _flat(record.get("adapter_stats", {})))
            self.console.print(f"step {record['step']}/{self.total}  {info}{stats}", highlight=False)


def _flat(stats: dict):
    for adapter, values in stats.items():
        for key, value in values.items():
            shown = "[" + " ".join(f"{v:.2f}" for v in value) + "]" if isinstance(value, list) else f"{value:.4g}"
            yield f"{adapter}.{key}", shown


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """CUDA: peak allocated by this run; CPU: the process's peak resident set (covers all it did so far)."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_max_memory_allocated"}
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "kind": "process_max_rss"}
    except ImportError:  # Windows
        return {"bytes": None, "kind": "unavailable"}


def environment(device: torch.device) -> dict:
    import transformers

    import peftlab

    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        name = f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    return {"device": name, "versions": {"peftlab": peftlab.__version__, "torch": torch.__version__,
                                         "transformers": transformers.__version__, "python": platform.python_version()}}
