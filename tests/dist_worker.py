"""Distributed training scenarios for tests/test_distributed.py, run by torchrun in 2 CPU processes:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR [--every-method]

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
}


def run(name: str, out_dir, distributed: str, **extra) -> dict:
    fields, _ = SCENARIOS[name]
    args = TrainArgs(out=str(out_dir), distributed=distributed, **{**COMMON, **fields, **extra})
    return train(args, model=tiny_llama(), tokenizer=tiny_tokenizer(), records=RECORDS)


def quantize_blocks(model) -> None:
    """Every linear layer of the decoder blocks (adapted ones too) as a bitsandbytes NF4 ``Linear4bit``."""
    import bitsandbytes as bnb

    from peftlab.core.adapter import AdaptedModule, BaseView

    for name, module in list(model.model.layers.named_modules()):
        if type(module) is not torch.nn.Linear or ".adapters." in f".{name}.":
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        q = q.to("cpu")  # moving a Params4bit quantizes it
        parent_name, _, child = name.rpartition(".")
        parent = model.model.layers.get_submodule(parent_name)
        setattr(parent, child, q)
        if isinstance(parent, AdaptedModule):
            parent.view = BaseView(q)


def qlora_run(strategy: str, steps: int = 3) -> dict:
    """QLoRA through the distributed runtime by hand (the loop cannot attach to a 4-bit base yet): LoRA
    attached to the float model, then the blocks quantized to NF4; a few steps of the global batch 4."""
    import peftlab
    from peftlab.train import distributed
    from peftlab.train.data import Collator, build_datasets
    from peftlab.train.step import accumulate_gradients

    model = tiny_llama()
    torch.manual_seed(0)
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=COMMON["target_modules"], init_lora_weights="gaussian"))
    quantize_blocks(model)
    model.train()
    runtime = distributed.start(strategy, "cpu")
    runtime.place(model, torch.device("cpu"))
    forward = runtime.wrap(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokenizer = tiny_tokenizer()
    data, _ = build_datasets(RECORDS, tokenizer, max_length=96, eval_size=0)
    collate = Collator(tokenizer.pad_token_id)
    losses = []
    for step in range(steps):
        batch = collate(runtime.shard([data[step * 4 + i] for i in range(4)]))
        losses.append(accumulate_gradients(forward, [batch], torch.device("cpu"), runtime)[0])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    kinds: dict[str, int] = {}
    for p in model.parameters():
        kinds[type(p).__name__] = kinds.get(type(p).__name__, 0) + 1
    runtime.close()
    return {"losses": losses, "parameter_types": kinds, "distributed": runtime.describe()}


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


def main(out_root: str, every_method: bool = False) -> None:
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
        run(name, f"{out_root}/{name}", strategy)
    if importlib.util.find_spec("bitsandbytes"):  # an optional dependency (the gpu extra)
        qlora = qlora_run("fsdp")
        if dist.get_rank() == 0:
            with open(f"{out_root}/qlora_fsdp.json", "w") as fh:
                json.dump(qlora, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], every_method="--every-method" in sys.argv[2:])
