"""The SFT training loop: one adapter method on a causal LM, PEFT-format output, a metrics JSON.

    train(TrainArgs(method="dora", r=8, max_steps=20, out="runs/dora"))

Per optimizer step the loss is the mean over all label tokens of its ``grad_accum`` micro-batches
(each micro-batch's mean is weighted by its share of the step's tokens), so batch 4 x accum 1 and
batch 2 x accum 2 take the same step. The model's output loss already includes the adapters'
regularisers (the extra-loss forward hook); weighting by token share counts them once per step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from functools import partial
from pathlib import Path

import torch

from peftlab import kv_prefill
from peftlab.core.config import ConfigError
from peftlab.core.hooks import log_stats, step_end
from peftlab.core.inject import count_parameters, delete_adapter, model_state
from peftlab.core.registry import method_for
from peftlab.core.state import atomic_write_bytes, save_adapter
from peftlab.train import checkpoint as ckpt
from peftlab.train import distributed, galore
from peftlab.train.activations import checkpointing
from peftlab.train.args import TrainArgs, build_config
from peftlab.train.embeddings import host_embeddings
from peftlab.train.data import Collator, build_datasets, example_order, fingerprint, load_records
from peftlab.train.evaluate import adapters_off as _adapters_off, evaluate
from peftlab.train.frugal import (attach_initial, init_batches, init_before_quantizing, load_base, loss_function,
                                  needs_dense_init, optimizer_class, optimizer_state_bytes, prepare_model)
from peftlab.train.packing import (GRAPH_PAD, CompiledSteps, PackingCollator, batch_tokens, check_packing,
                                   compiled_steps)
from peftlab.train.progress import Reporter, environment, peak_memory, reset_peak_memory
from peftlab.train.step import accumulate_gradients

# Arguments that fix the adapter and the data order: a resumed run must use the same values.
_RESUME_MUST_MATCH = ("method", "r", "lora_alpha", "target_modules", "config_overrides", "seed", "batch_size",
                      "grad_accum", "max_length", "eval_fraction", "eval_size", "adapter_name")


def lr_factor(kind: str, warmup: int, total: int):
    """HF's schedules: linear warmup from 0, then linear / cosine decay to 0, or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)
    return factor


def resolve_device(requested: str, model: torch.nn.Module | None) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if model is not None:
        return next(model.parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(args: TrainArgs, model: torch.nn.Module | None = None, tokenizer=None,
          records: list[dict] | None = None, attach_fn=None) -> dict:
    """Train one adapter; write out/adapter (PEFT format) and out/metrics.json; return the metrics.

    With a caller's ``model`` (``compare`` trains many methods on one preloaded base), the only lasting
    change is the attached adapter ``args.adapter_name``, made the active one, its base frozen by
    ``attach``: train/eval mode and gradient checkpointing are restored, and with ``device="auto"`` the
    model stays where it is. Delete the adapter (``peftlab.delete_adapter``) to get the base back;
    methods that rewrite base weights at init (PiSSA, OLoRA) change the base for good.

    ``attach_fn(model, config) -> (model, on_step)`` trains another library's adapters instead (compare
    --with-peft puts HF PEFT's on the same loop); ``on_step(step)`` replaces ``step_end``.
    """
    args.validate()
    if attach_fn is None and galore.is_galore(args):
        attach_fn = galore.attach_full  # full-parameter training; the whole model is saved
    if attach_fn is not None and (args.save_every or args.resume or args.loraplus_lr_ratio is not None):
        raise ConfigError("checkpoints, resume and LoRA+ need peftlab's own adapters; attach_fn supports none of them")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.resolve_resume(args.resume, out) if args.resume else None
    if attach_fn is not None and args.distributed not in ("auto", "none"):
        raise ConfigError("distributed training needs peftlab's own adapters; attach_fn supports none")
    runtime = distributed.start("none" if attach_fn else args.distributed, args.device, args.batch_size)
    # before loading: a model we load goes to cuda when there is one; so does a base to quantize (compare
    # hands over a model on the host)
    device = runtime.device or resolve_device(args.device, None if args.quantize else model)
    config = build_config(args)
    dense_init = attach_fn is None and needs_dense_init(args, config)  # LoftQ under --quantize
    if model is None:
        model, loaded_tokenizer = load_base(args, device, stream=not dense_init)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("train() was given a model but no tokenizer; pass tokenizer= as well")
    initial = init_before_quantizing(model, config, args.adapter_name, args.seed) if dense_init else None
    model = prepare_model(args, model, device)  # QLoRA: quantized layer by layer onto the device
    runtime.place(model, device)  # FSDP moves the base layer by layer as it shards it
    if records is None:
        from peftlab.defaults import default_records

        records = load_records(args.data) if args.data else default_records()
    train_set, eval_set = build_datasets(records, tokenizer, args.max_length, args.eval_fraction, args.eval_size,
                                         args.seed)
    collate = Collator(tokenizer.pad_token_id)

    torch.manual_seed(args.seed)  # the adapter's initial weights depend on the seed only
    random.seed(args.seed)
    batches = partial(init_batches, train_set, collate, args.batch_size, args.init_batches)
    kv_table = kv_prefill.table_for_args(model, tokenizer, config, args.kv_prefix_init, args.kv_prefix_text, batches)
    if attach_fn is None:
        attach_initial(model, config, args.adapter_name, initial, batches=batches)
        if kv_table is not None:
            kv_prefill.load_table(model, args.adapter_name, kv_table)
        on_step = partial(step_end, model)
    else:  # another library's adapters (compare --with-peft): attach_fn(model, config) -> (model, on_step)
        model, on_step = attach_fn(model, config, **({} if kv_table is None else {"kv_table": kv_table}))
    try:
        runtime.wrap(model)
        optimizer, scheduler, lr = _optimizer(args, model, config)
        state, eval_after = _train_attached(args, model, optimizer, scheduler, train_set, eval_set, collate, device,
                                            out, resume_from, fingerprint(records), on_step, runtime)
    except BaseException:
        runtime.close(wait=False)  # no barrier: the other processes may never get there
        if attach_fn is None:
            delete_adapter(model, args.adapter_name)  # a failed run leaves the caller's model as it was given
        raise
    if attach_fn is None:  # adapters are whole on every process: rank 0 writes the consolidated file
        adapter_dir = out / "adapter"
        runtime.on_main(save_adapter, model, adapter_dir, name=args.adapter_name)
    else:
        adapter_dir = out / "adapter"
        model.save_pretrained(adapter_dir)
    trainable, total = count_parameters(model)
    if attach_fn is None:
        config = model_state(model).configs[args.adapter_name]  # as trained: AdaLoRA rewrites its rank_pattern
    metrics = {
        "method": args.method if args.adapter_config is None else None, "adapter_config": args.adapter_config,
        "peft_type": config.peft_type, "config": config.to_dict(),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100.0 * trainable / max(1, total), "effective_lr": lr,
        "optimizer": {"kind": "loraplus" if args.loraplus_lr_ratio is not None else args.optim,
                      "state_bytes": optimizer_state_bytes(optimizer),
                      "groups": [{"lr": g["initial_lr"], "tensors": len(g["params"]),
                                  "params": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups]},
        "steps": state["step"], "examples": state["examples_seen"], "losses": state["history"],
        "eval_before": state["eval_before"], "eval_after": eval_after,
        "eval_records": len(eval_set), "train_records": len(train_set), "data_fingerprint": state["data_fingerprint"],
        "train_time_s": state["train_time_s"], "tokens": state["tokens"], "label_tokens": state["label_tokens"],
        "tokens_per_s": state["tokens"] / state["train_time_s"] if state["train_time_s"] > 0 else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "peak_memory": peak_memory(device), "seed": args.seed, "args": state["args"], "compiled": state["compiled"],
        "adapter_dir": str(adapter_dir), **environment(device), "distributed": runtime.describe(),
    }
    if runtime.is_main:
        atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    runtime.close()
    return metrics


def _optimizer(args: TrainArgs, model, config):
    if galore.is_galore(args):
        optimizer = galore.make_optimizer(model, config, args.lr, args.weight_decay, args.optim == "adamw_8bit")
        factor = lr_factor(args.lr_scheduler, args.warmup_steps, args.max_steps)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), args.lr
    lr = args.lr * method_for(config).rate(config)
    if args.loraplus_lr_ratio is not None:
        from peftlab.train.optim import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, optimizer_class(args.optim), lr=lr,
                                              loraplus_lr_ratio=args.loraplus_lr_ratio,
                                              weight_decay=args.weight_decay)
    else:
        optimizer = optimizer_class(args.optim)([p for p in model.parameters() if p.requires_grad], lr=lr,
                                                weight_decay=args.weight_decay)
    factor = lr_factor(args.lr_scheduler, args.warmup_steps, args.max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), lr


def _train_attached(args: TrainArgs, model, optimizer, scheduler, train_set, eval_set, collate, device, out: Path,
                    resume_from: Path | None, fingerprint: str, on_step,
                    runtime: distributed.Runtime | None = None) -> tuple[dict, dict | None]:
    """Eval, the steps, eval; the model's train mode and gradient checkpointing are restored after."""
    all_args = dataclasses.asdict(args)
    was_training, had_checkpointing = model.training, _checkpointing(model)
    if args.gradient_checkpointing and not had_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: make checkpointed blocks see a grad-requiring input
    if args.packing:
        check_packing(model)
    offload = contextlib.ExitStack()
    offload.enter_context(host_embeddings(model, args.offload_embeddings))  # before the peak: its table is gone
    reset_peak_memory(device)
    try:
        state = {"step": 0, "examples_seen": 0, "history": [], "train_time_s": 0.0, "tokens": 0, "label_tokens": 0,
                 "eval_before": None, "data_fingerprint": fingerprint, "args": all_args}
        if resume_from is not None:
            _check_resumable(ckpt.read_trainer_state(resume_from), all_args, fingerprint, resume_from)
            state = ckpt.load_checkpoint(resume_from, model, args.adapter_name, optimizer, scheduler)
            state["args"] = all_args
        elif args.eval_before:  # the base model: adapters off (methods such as prefix tuning are not identity at init)
            with _adapters_off(model):
                state["eval_before"] = evaluate(model, eval_set, collate, args.eval_batch_size, device)
        # compiled first: checkpointing wraps the compiled blocks' calls (activations.compiled_placement)
        with compiled_steps(args, model, device) as compiled, \
                checkpointing(model, args.checkpointing, keep_last=args.checkpoint_keep):
            _run_steps(args, model, optimizer, scheduler, train_set, collate, device, state, out, on_step,
                       runtime or distributed.Runtime(), compiled)
            state["compiled"] = compiled.describe()
        return state, evaluate(model, eval_set, collate, args.eval_batch_size, device)
    finally:
        offload.close()
        if args.gradient_checkpointing and not had_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            model.disable_input_require_grads()
        model.train(was_training)


def _checkpointing(model) -> bool:
    """Whether gradient checkpointing is on (what transformers' renamed-in-v5 property computes)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _check_resumable(state: dict, args: dict, fingerprint: str, source: Path) -> None:
    saved = state["args"]
    for key in _RESUME_MUST_MATCH:
        if saved.get(key) != args.get(key):
            raise ckpt.CheckpointError(f"{source}: cannot resume with {key}={args.get(key)!r}; "
                                       f"the checkpoint was trained with {key}={saved.get(key)!r}")
    if state["data_fingerprint"] != fingerprint:
        raise ckpt.CheckpointError(f"{source}: the training data differs from the checkpoint's "
                                   f"(fingerprint {fingerprint} vs {state['data_fingerprint']})")
    if state["step"] >= args["max_steps"]:
        raise ckpt.CheckpointError(f"{source}: already at step {state['step']}; raise max_steps to continue")


def _run_steps(args: TrainArgs, model, optimizer, scheduler, train_set, collate, device, state: dict,
               out: Path, on_step, runtime: distributed.Runtime, compiled: CompiledSteps) -> None:
    stream = example_order(len(train_set), args.seed, start=state["examples_seen"])
    collate = PackingCollator() if args.packing else collate.padded_to(GRAPH_PAD) if compiled.graphs else collate
    model.train()
    runtime.diverge_rng()
    main = runtime.is_main
    loss_fn = loss_function(args, model)

    def gradients(batches: list) -> tuple:
        return accumulate_gradients(runtime.forward_model or model, batches, device, runtime, loss_fn,
                                    compiled.own_grads)
    with Reporter(args.max_steps, state["step"], enabled=args.progress and main,
                  log_every=args.log_every if main else 0) as report:
        for step in range(state["step"] + 1, args.max_steps + 1):
            started = time.perf_counter()
            batches = [collate(runtime.shard([train_set[next(stream)] for _ in range(args.batch_size)]))
                       for _ in range(args.grad_accum)]
            lr_now = scheduler.get_last_lr()[0]
            compiled.begin_step()
            try:
                step_loss, step_tokens = gradients(batches)
            except Exception as exc:  # noqa: BLE001  (an "auto" compile's failure: the step runs again, eagerly)
                if not compiled.fall_back(exc):
                    raise
                optimizer.zero_grad(set_to_none=True)  # what a half-done backward left
                step_loss, step_tokens = gradients(batches)
            compiled.stepped()
            if args.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            # adapter schedules (AdaLoRA's rank budget) see completed steps, 1-based, and still the gradients
            on_step(step)
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            tokens = int(runtime.total(sum(batch_tokens(b) for b in batches)))
            state["step"], state["examples_seen"] = step, state["examples_seen"] + args.batch_size * args.grad_accum
            state["train_time_s"] += elapsed
            state["tokens"] += tokens
            state["label_tokens"] += step_tokens
            record = {"step": step, "loss": step_loss if step_tokens else None, "lr": lr_now,
                      "tokens": tokens, "label_tokens": step_tokens, "time_s": elapsed}
            if report.wants_log(step):
                stats = log_stats(model)
                if stats:
                    record["adapter_stats"] = stats
            state["history"].append(record)
            report.step(record, tokens_per_s=state["tokens"] / max(state["train_time_s"], 1e-9))
            if args.save_every and step % args.save_every == 0:
                runtime.on_main(ckpt.save_checkpoint, out, step, model, args.adapter_name, optimizer, scheduler, state)
