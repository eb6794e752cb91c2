"""Distributed training scenarios for tests/test_distributed.py, run by torchrun in 2 CPU processes:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR [--resume CKPT]
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR --every-method

Each scenario trains a fresh tiny Llama and writes OUT_DIR/<scenario>/ (metrics.json, adapter/,
checkpoints/) from rank 0. The test runs the same scenarios in one process and compares.
"""
import importlib.util
import json
import sys

import torch
import torch.distributed as dist

from models import tiny_llama, tiny_tokenizer
from peftlab.train.loop import TrainArgs, train

# Replies of different lengths, so the processes' slices hold different numbers of label tokens.
RECORDS = [{"instruction": f"add {i} and {i * 7 % 11}", "input": "", "output": f"{i + i * 7 % 11}" + "!" * (i % 7)}
           for i in range(40)]
COMMON = dict(lr=1e-2, max_length=96, eval_size=4, log_every=0, progress=False, r=4,
              target_modules=["q_proj", "v_proj", "down_proj"])
# name -> (TrainArgs fields, strategy on 2 processes); the global batch is batch_size x grad_accum
SCENARIOS = {
    "lora_ddp": (dict(method="lora", max_steps=4, batch_size=4), "ddp"),
    "lora_fsdp_accum": (dict(method="lora", max_steps=4, batch_size=2, grad_accum=2, save_every=2), "fsdp"),
    "dora_fsdp_checkpointing": (dict(method="dora", max_steps=3, batch_size=4, gradient_checkpointing=True), "fsdp"),
    "loha_ddp_accum": (dict(method="loha", max_steps=3, batch_size=2, grad_accum=2), "ddp"),
    "lora_ddp_fused_ce": (dict(method="lora", max_steps=3, batch_size=4, fused_ce=True), "ddp"),
    "dora_fsdp_offload": (dict(method="dora", max_steps=3, batch_size=4, checkpointing="offload"), "fsdp"),
    # QLoRA: every block linear in NF4 (bitsandbytes' CPU backend here), bf16 compute
    "qlora_fsdp": (dict(method="lora", max_steps=3, batch_size=4, quantize="nf4", device="cpu"), "fsdp"),
}
NEEDS = {"qlora_fsdp": "bitsandbytes"}  # optional packages (the gpu extra)


def run(name: str, out_dir, distributed: str, **extra) -> dict:
    fields, _ = SCENARIOS[name]
    args = TrainArgs(out=str(out_dir), distributed=distributed, **{**COMMON, **fields, **extra})
    return train(args, model=tiny_llama(), tokenizer=tiny_tokenizer(), records=RECORDS)


def all_methods(strategy: str, out_root: str) -> dict:
    """Every registered method, 3 steps: the losses (or the error) by name."""
    import peftlab

    results = {}
    for name in sorted(peftlab.variants()):
        try:
            args = TrainArgs(out=f"{out_root}/{name}", distributed=strategy, method=name, max_steps=3, batch_size=4,
                             **COMMON)
            metrics = train(args, model=tiny_llama(), tokenizer=tiny_tokenizer(), records=RECORDS)
            results[name] = [h["loss"] for h in metrics["losses"]]
        except Exception as exc:  # recorded, so the test names every method that fails
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def main(out_root: str, every_method: bool = False, resume: str | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # once for all scenarios; train() joins it and leaves it open
    if every_method:
        for strategy in ("ddp", "fsdp"):
            results = all_methods(strategy, f"{out_root}/{strategy}")
            if dist.get_rank() == 0:
                with open(f"{out_root}/all_methods_{strategy}.json", "w") as fh:
                    json.dump(results, fh)
        dist.destroy_process_group()
        return
    for name, (_, strategy) in SCENARIOS.items():
        if name not in NEEDS or importlib.util.find_spec(NEEDS[name]):
            run(name, f"{out_root}/{name}", strategy)
    if resume:  # a checkpoint written by one process, continued by two
        run("lora_fsdp_accum", f"{out_root}/resumed_on_two", "fsdp", resume=resume)
    dist.destroy_process_group()


if __name__ == "__main__":
    options = sys.argv[2:]
    main(sys.argv[1], every_method="--every-method" in options,
         resume=options[options.index("--resume") + 1] if "--resume" in options else None)
