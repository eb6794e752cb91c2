"""Hot-swap under torch.compile, and export (merged model, GGUF LoRA): time, size, recompiles, agreement.

    python bench/arith.py --shape 1b4 --device cuda --out results.json      # GPU run (bench/gpu/arith.sh)
    python bench/arith.py --shape tiny --device cpu --backend eager --swaps 2 --steps 2 --out smoke.json
    python bench/arith.py --table results.json                              # markdown table from a results file

A Llama-shaped model with random weights (bf16 on GPU) is built from a config. One LoRA is loaded, padded to
``--max-rank`` by ``prepare_for_hotswap`` and the model is compiled; then ``--swaps`` adapters of other ranks,
alphas and targets are swapped in. Recorded: compile time, forward latency, the time of each swap, dynamo's
count of compiled graphs before and after the swaps (``recompiles``, expected 0; the tests enforce it with
``error_on_recompile``), and the largest difference between the compiled and the eager output after each swap.
Then the adapter is written as a GGUF LoRA (read back with gguf) and the model is merged and saved as sharded
safetensors, reloaded with transformers, and its logits compared with the adapted model's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_step import ALL_LINEAR, SHAPES, environment  # noqa: E402

# 1B widths with 4 layers: realistic matmuls, a compile that fits the GPU time budget
LOCAL_SHAPES = {"1b4": dict(SHAPES["1b"], model=dict(SHAPES["1b"]["model"], num_hidden_layers=4), batch=1, seq=256),
                "tiny": dict(SHAPES["tiny"], batch=1, seq=32)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def build(shape: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LOCAL_SHAPES[shape]["model"]), dtype=dtype)
    return model.eval()


def swap_sources(model, folder: Path, swaps: int, max_rank: int) -> list[Path]:
    """Adapters to swap in: ranks max_rank, max_rank/2, ...; alphas and targets vary."""
    import torch

    import peftlab
    from peftlab.core.inject import adapted_modules

    paths = []
    for k in range(swaps + 1):
        rank = max(1, max_rank >> (k % 3))
        targets = ALL_LINEAR if k % 2 == 0 else ALL_LINEAR[:4]
        config = peftlab.LoraConfig(r=rank, lora_alpha=float(2 * rank + k), target_modules=targets)
        peftlab.attach(model, config, name=f"src{k}")
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for _, module in adapted_modules(model):
                for p in module.adapters[f"src{k}"].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(peftlab.save_adapter(model, folder / f"src{k}", name=f"src{k}"))
        peftlab.delete_adapter(model, f"src{k}")
    return paths


def run(args) -> dict[str, Any]:
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    import peftlab
    from peftlab.export import save_merged
    from peftlab.hotswap import hotswap_adapter, prepare_for_hotswap

    shape = LOCAL_SHAPES[args.shape]
    model = build(args.shape, args.device)
    ids = torch.randint(3, shape["model"]["vocab_size"], (shape["batch"], shape["seq"]), device=args.device)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = swap_sources(model, folder, args.swaps, args.max_rank)
        peftlab.load_adapter(model, sources[0])
        prepare_for_hotswap(model, target_rank=args.max_rank)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=args.backend)
        with torch.no_grad():
            _, compile_s = _timed(lambda: compiled(ids).logits, args.device)
            graphs = counters["stats"]["unique_graphs"]
            latencies = [_timed(lambda: compiled(ids).logits, args.device)[1] for _ in range(args.steps)]
            swap_ms, diffs = [], []
            for path in sources[1:] + sources[:1]:  # recompiles are counted, not raised: the run records them
                _, took = _timed(lambda: hotswap_adapter(model, path), args.device)
                swap_ms.append(took * 1e3)
                got = compiled(ids).logits.float()
                ref = model(ids).logits.float()
                diffs.append(float((got - ref).abs().max()))
            adapted_logits = model(ids).logits.float()
        result["hotswap"] = {
            "backend": args.backend, "compile_s": compile_s, "forward_ms_median": statistics.median(latencies) * 1e3,
            "swaps": len(swap_ms), "swap_ms_median": statistics.median(swap_ms), "swap_ms_max": max(swap_ms),
            "graphs_before": graphs, "graphs_after": counters["stats"]["unique_graphs"],
            "recompiles": counters["stats"]["unique_graphs"] - graphs, "max_abs_diff_compiled_vs_eager": max(diffs),
            "logits_abs_max": float(adapted_logits.abs().max()),
        }
        result["export_gguf"] = gguf_part(model, folder)
        result["export_merged"] = merged_part(model, folder, ids, adapted_logits, args, save_merged)
    return result


def gguf_part(model, folder: Path) -> dict[str, Any]:
    from peftlab.export import write_gguf_lora

    try:
        from gguf import GGUFReader
    except ImportError as exc:  # the GPU machine has gguf only from the carried wheels
        return {"error": f"gguf not installed: {exc}"}
    path, took = _timed(lambda: write_gguf_lora(model, "default", folder / "lora.gguf", "f16"), "cpu")
    reader = GGUFReader(path)
    return {"seconds": took, "bytes": path.stat().st_size, "tensors": len(reader.tensors),
            "names_sample": sorted(t.name for t in reader.tensors)[:2]}


def merged_part(model, folder: Path, ids, adapted_logits, args, save_merged) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    out, took = _timed(lambda: save_merged(model, folder / "merged", dtype=args.dtype,
                                           max_shard_size=args.max_shard_size), args.device)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    size = sum((out / s).stat().st_size for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").to(args.device).eval()
    with torch.no_grad():
        logits = reloaded(ids).logits.float()
    return {"seconds": took, "dtype": str(next(reloaded.parameters()).dtype), "shards": len(shards), "bytes": size,
            "index_json": (out / "model.safetensors.index.json").is_file(),
            "max_abs_diff_vs_adapted": float((logits - adapted_logits).abs().max())}


def markdown_table(doc: dict[str, Any]) -> str:
    env, args, res = doc["env"], doc["args"], doc["results"]
    hs, gg, mg = res["hotswap"], res["export_gguf"], res["export_merged"]
    lines = [f"Shape `{args['shape']}`, {env.get('gpu') or env.get('cpu')}, torch {env['torch']}, "
             f"commit {str(env.get('commit'))[:10]}", "",
             "| measure | value |", "|---|---|",
             f"| compile ({hs['backend']}) | {hs['compile_s']:.1f} s |",
             f"| forward, compiled | {hs['forward_ms_median']:.2f} ms |",
             f"| hot-swap ({hs['swaps']} swaps) | median {hs['swap_ms_median']:.1f} ms, max {hs['swap_ms_max']:.1f} ms |",
             f"| recompiles after swaps | {hs['recompiles']} |",
             f"| compiled vs eager after swap | max abs diff {hs['max_abs_diff_compiled_vs_eager']:.3g} "
             f"(logits up to {hs['logits_abs_max']:.3g}) |"]
    if "error" in gg:
        lines.append(f"| GGUF LoRA | {gg['error']} |")
    else:
        lines.append(f"| GGUF LoRA (f16) | {gg['tensors']} tensors, {gg['bytes'] / 2**20:.1f} MiB, {gg['seconds']:.2f} s |")
    lines.append(f"| merged export ({mg['dtype']}) | {mg['shards']} shards, {mg['bytes'] / 2**30:.2f} GiB, "
                 f"{mg['seconds']:.1f} s; reload max abs logit diff {mg['max_abs_diff_vs_adapted']:.3g} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(LOCAL_SHAPES), default="1b4")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager for a quick CPU smoke run)")
    p.add_argument("--max-rank", type=int, default=32)
    p.add_argument("--swaps", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="bf16", help="merged export dtype")
    p.add_argument("--max-shard-size", default="500MB")
    p.add_argument("--out", help="results JSON path")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    doc = {"env": environment(args.device), "args": vars(args), "results": run(args)}
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(markdown_table(doc))


if __name__ == "__main__":
    main()
