"""CPU count for the pointwise recompute's per-module rule (peftlab/train/pointwise.py): what one compiled decoder
layer of the 1B Llama shape (hidden 2048, MLP 8192, 32 / 8 heads, bf16, r16 on every linear) keeps for backward with
the old rule (``PEFTLAB_POINTWISE_SAVE_SMALL=0``: per-module ops recomputed) and the current one, in total and by
shape, for the methods that take the recompute. Counted through saved-tensor hooks (parameters and buffers
excluded) on one forward + backward of 64 tokens, traced by aot_eager (the partitioner's choices, no kernels): the
per-module tensors are per layer, so a 16-layer step keeps 16x the difference. Each row is a fresh process (the rule
is read when a region is traced). Not a GPU number: bench/train_step.py's rows are.

    python bench/per_module_cpu.py --out bench/results/per_module_cpu.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_cpu_rows  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=4096)
METHODS = ("lora", "dora", "hra", "oft", "loha", "lokr", "vera", "tied_lora", "adalora")


def kept(variant: str, tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftlab
    from peftlab.train.args import TrainArgs
    from peftlab.train.packing import compiled_steps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.config.use_cache = False
    model.requires_grad_(False)
    peftlab.attach(model, peftlab.variants()[variant]("all-linear", 16))
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shapes = collections.Counter()

    def keep(t):
        if t.untyped_storage().data_ptr() not in owned:
            shapes[f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"] += t.numel() * t.element_size()
        return t

    args = TrainArgs(compile="aot_eager", compile_scope="layers", recompute_pointwise=True)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, tokens))
    with compiled_steps(args, model, torch.device("cpu")):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return {"kept_mib": round(sum(shapes.values()) / 2**20, 3),
            "by_shape_mib": {k: round(v / 2**20, 3) for k, v in sorted(shapes.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/per_module_cpu.json"))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "RULE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(kept(args.child[0], args.tokens)))
        return
    rows = []
    for variant in args.methods.split(","):
        row = {"method": variant}
        for rule, flag in (("old", "0"), ("current", "1")):
            env = {**os.environ, "PEFTLAB_POINTWISE_SAVE_SMALL": flag, "PEFTLAB_FAST": "1"}
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", variant, rule],
                                 env=env, capture_output=True, text=True, check=True).stdout
            row[rule] = json.loads(out.strip().splitlines()[-1])
        row["current_minus_old_mib_per_layer"] = round(row["current"]["kept_mib"] - row["old"]["kept_mib"], 3)
        print(f"{variant:10s} old {row['old']['kept_mib']:8.3f} MiB  current {row['current']['kept_mib']:8.3f} MiB")
        rows.append(row)
    write_cpu_rows(args, SHAPE, rows)


if __name__ == "__main__":
    main()
