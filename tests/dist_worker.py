"""Distributed training scenarios for tests/test_distributed.py, run by torchrun in 2 CPU processes:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR

Each scenario trains a fresh tiny Llama and writes OUT_DIR/<scenario>/ (metrics.json, adapter/,
checkpoints/) from rank 0. The test runs the same scenarios in one process and compares.
"""
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
}


def run(name: str, out_dir, distributed: str, **extra) -> dict:
    fields, _ = SCENARIOS[name]
    args = TrainArgs(out=str(out_dir), distributed=distributed, **{**COMMON, **fields, **extra})
    return train(args, model=tiny_llama(), tokenizer=tiny_tokenizer(), records=RECORDS)


def main(out_root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # once for all scenarios; train() joins it and leaves it open
    for name, (_, strategy) in SCENARIOS.items():
        run(name, f"{out_root}/{name}", strategy)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
