"""CPU proxy for ``TrainArgs.recompute_pointwise`` (peftlab/train/pointwise.py): what one compiled decoder layer of
the 1B Llama shape (hidden 2048, MLP 8192, 32 / 8 heads, bf16) keeps for backward, per token, with LoRA r16 on every
linear, against the frozen base's layer; and the layer's forward + backward time on this CPU. Kept bytes are counted
through saved-tensor hooks (parameters excluded) at two sequence lengths, and the per-token figure is their slope,
so per-layer constants (the adapter factors' bf16 copies) drop out. Not a GPU number: peak memory and step time on
the GPU come from bench/train_step.py (impl ``peftlab_compiled_pointwise``).

    python bench/pointwise_cpu.py --out bench/results/pointwise_cpu.json
    python bench/pointwise_cpu.py --methods dora,ia3,vera --out bench/results/pointwise_cpu_methods.json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_cpu_rows  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=4096)
ROWS = {  # name: (variant or None, PEFTLAB_FAST, recompute_pointwise)
    "frozen base": (None, "1", False),
    "LoRA, fused node (CUDA's default path)": ("lora", "1", False),
    "LoRA, fused node, recompute_pointwise": ("lora", "1", True),
    "LoRA, reference path (PEFTLAB_FAST=0)": ("lora", "0", False),
    "LoRA, reference path, recompute_pointwise": ("lora", "0", True),
}


def measure(adapter: str | None, fast: str, pointwise: bool, lengths: tuple[int, int], steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftlab
    from peftlab.train.packing import compile_model
    from peftlab.train.pointwise import recompute_pointwise

    os.environ["PEFTLAB_FAST"] = fast
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.requires_grad_(False)
    if adapter:
        peftlab.attach(model, peftlab.variants()[adapter]("all-linear", 16))
    compile_model(model, "inductor", "layers")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer, kept, times = model.model.layers[0], {}, []
    with recompute_pointwise(model) if pointwise else contextlib.nullcontext():
        for length in lengths:
            ids = torch.randint(3, 512, (1, length))
            pos = torch.arange(length)[None]
            for step in range(steps + 1):  # the first call compiles
                sizes = []

                def pack(t):
                    if t.untyped_storage().data_ptr() not in params:
                        sizes.append(t.numel() * t.element_size())
                    return t
                hidden = model.model.embed_tokens(ids).detach().requires_grad_(True)
                start = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = layer(hidden, position_embeddings=model.model.rotary_emb(hidden, pos), position_ids=pos)
                out = out[0] if isinstance(out, tuple) else out
                out.float().pow(2).mean().backward()
                if step and length == lengths[-1]:
                    times.append((time.perf_counter() - start) * 1000)
            kept[length] = sum(sizes)
    short, long = lengths
    return {"kept_bytes": {str(k): v for k, v in kept.items()},
            "kept_bytes_per_token": (kept[long] - kept[short]) / (long - short),
            "layer_ms_median": statistics.median(times), "layer_ms": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,256")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", default="", help="other variants, each on CUDA's default path with and without")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lengths = tuple(int(v) for v in args.lengths.split(","))
    rows, table = [], dict(ROWS) if not args.methods else {"frozen base": ROWS["frozen base"]}
    for method in filter(None, args.methods.split(",")):
        table[method] = (method, "1", False)
        table[f"{method}, recompute_pointwise"] = (method, "1", True)
    for name, (adapter, fast, pointwise) in table.items():
        row = {"row": name, **measure(adapter, fast, pointwise, lengths, args.steps)}
        rows.append(row)
        print(f"{name:45s} kept {row['kept_bytes_per_token']:8.0f} B/token  layer {row['layer_ms_median']:.1f} ms")
    write_cpu_rows(args, SHAPE, rows)


if __name__ == "__main__":
    main()
