"""``peftlab compare --jobs N``: train the runs of a comparison in N processes at once on one device.

A small model on a GPU is launch-bound (the seed's preset on SmolLM2-135M: ~130-170 s a method alone on an
H200, the GPU mostly idle between kernel launches), so several runs side by side finish the comparison
several times sooner. Each worker is a fresh process (spawned: CUDA does not survive a fork) running
``run_compare`` on its share of the methods (round-robin) with the same ``--out``: every run writes its own
run folder, which is how a resumed comparison already finds finished runs. The parent then gathers them
(``run_compare(train=False)``): nothing is retrained, a run a worker could not finish is reported with its
error, and the results say ``jobs`` so nobody reads the shared-device times as solo times.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import replace
from typing import Any

from peftlab.compare.runner import CompareArgs, load_inputs, run_compare, unfinished_methods


def _worker(args: CompareArgs, jobs: int) -> None:
    run_compare(args, jobs=jobs)


def share(names: list[str], jobs: int) -> list[list[str]]:
    """Round-robin shares of ``names`` for ``jobs`` workers (no empty share)."""
    return [names[i::jobs] for i in range(min(jobs, len(names)))]


def run_jobs(args: CompareArgs, jobs: int, console=None) -> dict[str, Any]:
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return run_compare(args, console=console)
    inputs = load_inputs(args, None)  # a bad model or data path fails here, before any worker starts
    context = multiprocessing.get_context("spawn")
    # only what is left to train is shared out: a resumed folder's finished methods would leave some workers idle
    # while others queue several runs (on the H200, 2026-12-03, P-tuning queued behind BOFT, then MoLoRA, and never
    # started)
    parts = share(unfinished_methods(args), jobs)
    workers = [context.Process(target=_worker, args=(replace(args, methods=part, progress=False), len(parts)),
                               daemon=False) for part in parts]
    if console is not None:
        console.print(f"training {sum(map(len, parts))} methods in {len(workers)} processes at once")
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        if worker.exitcode and console is not None:
            console.print(f"[red]a compare worker exited with code {worker.exitcode}; its unfinished runs are "
                          "reported as such[/]")
    return run_compare(args, console=console, train=False, jobs=max(1, len(workers)), inputs=inputs)
