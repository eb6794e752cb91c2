"""How close a 4-bit base starts to its full-precision model: plain QLoRA (NF4, B = 0) against LoftQ.

    python bench/loftq.py --out bench/results/memory/loftq_cpu.json     # the offline default model, CPU
    python bench/loftq.py --smoke                                        # tiny random Llama

For each rank and LoftQ iteration count, every linear layer but the head gets NF4-quantized weights
(``peftlab.quant.loftq.nf4_round_trip``: bitsandbytes' blockwise NF4, tested bit-exact against it), and LoftQ's
factors where asked. The model stays dense (the quantized weights in float32), so the numbers are the
quantization's, not bitsandbytes' CPU kernels'. Recorded: the relative weight error ||W - (Q + s B A)|| / ||W||
over all adapted layers, and the eval loss on the default data's eval split against the full-precision model's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.results_io import environment, write_atomic  # noqa: E402


def _model_and_batches(smoke: bool, n_eval: int):
    import torch

    from peftlab.defaults import default_records, load_model_and_tokenizer
    from peftlab.train.data import Collator, build_datasets

    if smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4))
        ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
        return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    model, tokenizer = load_model_and_tokenizer(None, dtype="float32")
    _, eval_set = build_datasets(default_records(), tokenizer, 128, 0.05, n_eval, 0)
    collate = Collator(tokenizer.pad_token_id)
    return model, [collate([eval_set[j] for j in range(i, min(i + 8, len(eval_set)))])
                   for i in range(0, len(eval_set), 8)]


def _eval_loss(model, batches) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def run(args) -> dict:
    import torch

    from peftlab.quant.loftq import loftq_factors, nf4_round_trip

    torch.manual_seed(0)
    model, batches = _model_and_batches(args.smoke, args.eval_size)
    model.eval()
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    rows = [{"init": "full precision", "eval_loss": round(_eval_loss(model, batches), 5)}]
    configs = [("qlora", None, None)] + [("loftq", r, it) for r in args.ranks for it in args.iters]
    for init, rank, iters in configs:
        started, err2, ref2 = time.perf_counter(), 0.0, 0.0
        for name, module in linears.items():
            w = originals[name]
            if init == "qlora":
                approx = nf4_round_trip(w)
                module.weight.data.copy_(approx)
            else:  # the dense equivalent of Q + s B A (alpha = 2r, so s = 2)
                base, a, b = loftq_factors(w, 4, rank, iters, 2.0)
                approx = base + 2.0 * (b @ a)
                module.weight.data.copy_(approx)
            err2 += float((w - approx).pow(2).sum())
            ref2 += float(w.pow(2).sum())
        rows.append({"init": init, "r": rank, "loftq_iter": iters, "weight_rel_error": round((err2 / ref2) ** 0.5, 6),
                     "eval_loss": round(_eval_loss(model, batches), 5),
                     "init_s": round(time.perf_counter() - started, 2)})
        print(json.dumps(rows[-1]), flush=True)
    for name, module in linears.items():
        module.weight.data.copy_(originals[name])
    return {"benchmark": "loftq", "environment": environment("cpu"), "smoke": args.smoke,
            "model": "tiny random Llama" if args.smoke else "SmolLM2-135M-Instruct (offline default)",
            "eval_tokens_batches": len(batches), "layers": len(linears), "rows": rows}


def table(record: dict) -> str:
    full = record["rows"][0]["eval_loss"]
    lines = ["| init | r | LoftQ iterations | weight error | eval loss | vs full precision |", "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        lines.append(f"| {row['init']} | {row.get('r') or ''} | {row.get('loftq_iter') or ''} | "
                     f"{row.get('weight_rel_error', 0):.4f} | {row['eval_loss']:.4f} | {row['eval_loss'] - full:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--iters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5])
    p.add_argument("--eval-size", type=int, default=96)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    p.add_argument("--table", metavar="RESULTS_JSON")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())), end="")
        return
    if args.smoke:
        args.ranks, args.iters = [4], [1, 2]
    record = run(args)
    if args.out:
        write_atomic(Path(args.out), json.dumps(record, indent=1) + "\n")
    print(table(record), end="")


if __name__ == "__main__":
    main()
