"""Host time of a training step on the CPU: forward + backward + AdamW of a Llama with the 1B shape's 16 layers but
hidden size 64, so that the arithmetic is negligible and what is timed is the Python and operator work per layer
(the fused adapter nodes with PEFTLAB_FAST=1, as on a GPU), side by side with HF PEFT and the frozen base; with
``--compile inductor`` also with each decoder layer compiled (``compile_scope="layers"``; compiled in the warm-up).

On the H200 the 1B LoRA step is bound by that work (bench/README.md, 2026-12-03: 70 ms of GPU work but ~143 ms of
host time a profiled step), so changes to the per-layer path can be tried here first. Rounds alternate between the
implementations; the medians of the rounds are reported.

    python bench/train_overhead.py --methods lora,dora --compile inductor --out bench/results/train_overhead_cpu.json
    python bench/train_overhead.py --methods lora --compile inductor --checkpointing on --out ...

``--checkpointing on|offload`` runs every row under peftlab's block checkpointing (compiled blocks: around each
compiled call, or traced into their graphs with PEFTLAB_CKPT_COMPILED=traced; recorded as ``ckpt_placement``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from results_io import environment, write_atomic

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --variant NAME: the peftlab rows again with one library constant changed while they run (module, name, value)
# HRA's T under compile by a triangular solve (the default since the H200 measured the product form slower), or by the
# solve-free product form (PEFTLAB_WY_SERIES_MAX=16)
VARIANTS = {"wy-solve": ("peftlab.ops.factored", "SERIES_MAX_RANK", 0),
            "wy-product": ("peftlab.ops.factored", "SERIES_MAX_RANK", 16)}


@contextlib.contextmanager
def variant(name: str | None):
    """The library with ``VARIANTS[name]`` in effect (nothing for None)."""
    if name is None:
        yield
        return
    module, attr, value = VARIANTS[name]
    mod = importlib.import_module(module)
    old = getattr(mod, attr)
    setattr(mod, attr, value)
    try:
        yield
    finally:
        setattr(mod, attr, old)


def build(impl: str, method: str, layers: int, compile_backend: str | None = None) -> torch.nn.Module | None:
    """The proxy model adapted by ``impl`` with ``method`` (any name ``bench/train_step.py`` knows: its LoRA/DoRA
    entries, or a registered variant at r 8); None when PEFT lacks the method."""
    import peftlab
    from proxy import proxy_llama
    from train_step import Unmapped, method_entry

    model = proxy_llama(layers)
    model.requires_grad_(False)
    if impl == "frozen":  # the frozen base with one trainable tensor at the bottom: backward runs through every layer
        model.model.embed_tokens.weight.requires_grad_(True)
        return model.train()
    entry = method_entry(method)
    adapter = entry.peftlab(TARGETS, 8)
    if impl.startswith("peftlab"):
        peftlab.attach(model, adapter)
        if impl == "peftlab compiled":  # TrainArgs(compile=backend, compile_scope="layers")
            from peftlab.train.packing import compile_model

            compile_model(model, compile_backend, "layers")
    else:
        import peft

        try:
            model = peft.get_peft_model(model, entry.peft(adapter))
        except Unmapped:
            return None
    return model.train()


def step_ms(model: torch.nn.Module, ids: torch.Tensor, steps: int, ckpt: str = "off") -> float:
    from peftlab.train.activations import checkpointing

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    times = []
    with checkpointing(model, ckpt):
        for k in range(steps + 3):
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora,dora")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", metavar="BACKEND", help="also peftlab with each decoder layer compiled (inductor)")
    p.add_argument("--variant", choices=sorted(VARIANTS), help="also the peftlab rows with this change in effect")
    p.add_argument("--checkpointing", default="off", choices=["off", "on", "offload"],
                   help="every row under peftlab's block checkpointing (train/activations.py)")
    p.add_argument("--out")
    cli = p.parse_args()
    os.environ.setdefault("PEFTLAB_FAST", "1")  # the fused nodes a GPU run takes, here on the CPU
    torch.set_num_threads(1)
    ids = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {}
    for k, method in enumerate(cli.methods.split(",")):
        # one method at a time, its implementations alternating round by round; compiled graphs of one method do
        # not share dynamo's caches with the next (each GPU configuration runs in a fresh process too)
        torch._dynamo.reset()
        models = {"frozen base": build("frozen", "lora", cli.layers)} if k == 0 else {}
        changed: dict[str, str | None] = {}  # label -> the variant its rows run under
        for impl in ("peftlab", "peft") + (("peftlab compiled",) if cli.compile else ()):
            for var in (None, cli.variant) if impl.startswith("peftlab") and cli.variant else (None,):
                model = build(impl, method, cli.layers, cli.compile)
                if model is not None:
                    label = f"{method} {impl}" + (f", {var}" if var else "")
                    models[label], changed[label] = model, var
        for _ in range(cli.rounds):
            for label, model in models.items():
                with variant(changed.get(label)):
                    times.setdefault(label, []).append(round(step_ms(model, ids, cli.steps, cli.checkpointing), 3))
    median = {label: statistics.median(v) for label, v in times.items()}
    ratios = {label: round(median[label] / median[f"{label.split()[0]} peft"], 3) for label in median
              if label.split()[1] == "peftlab" and f"{label.split()[0]} peft" in median}
    ratios.update({f"{label} vs frozen": round(median[label] / median["frozen base"], 3) for label in median
                   if label != "frozen base"})
    print(json.dumps({"step_ms_median": median, "ratios": ratios}))
    if cli.out:
        write_atomic(Path(cli.out), json.dumps({"benchmark": "train_overhead_cpu", "environment": environment("cpu"),
                                                "layers": cli.layers, "hidden": 64, "batch": list(ids.shape),
                                                "checkpointing": cli.checkpointing,
                                                "ckpt_placement": os.environ.get("PEFTLAB_CKPT_COMPILED") or "around",
                                                "ckpt_reentrant": os.environ.get("PEFTLAB_CKPT_REENTRANT", "1") != "0",
                                                "step_ms": times, "step_ms_median": median,
                                                "ratios": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
