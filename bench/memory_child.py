"""bench/memory.py's child: one (setting, implementation) in this process (a ``--child`` subprocess, or inline with
``--inline`` / ``--smoke``): the base, each implementation's step, the timed loop and the GaLore loss curve."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

from memory_settings import ALL_LINEAR, CURVE, SETTINGS, SHAPES  # bench/ is on sys.path (bench/memory.py)


def _config(shape: str, smoke: bool):
    from transformers import LlamaConfig

    values = dict(SHAPES["tiny" if smoke else shape])
    if smoke:  # the tiny stand-in ties its head as the real shape does (8B and 70B do not)
        values["tie_word_embeddings"] = SHAPES[shape].get("tie_word_embeddings", True)
    return LlamaConfig(**values, attn_implementation="sdpa")


def _base(setting: dict, device: str, smoke: bool):
    """The random-weight base: streamed 4-bit for QLoRA settings, bf16 otherwise."""
    import torch

    config = _config(setting["shape"], smoke)
    if setting.get("quant"):
        from peftlab.quant.bnb import record_quantization
        from peftlab.quant.stream import load_into, random_source, skeleton

        model = skeleton(config, setting["quant"], True, torch.bfloat16)
        load_into(model, random_source(model, device), device)
        record_quantization(model, setting["quant"], True, torch.bfloat16)
        return model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _peftlab_step_fn(model, setting: dict, device):
    import torch

    import peftlab
    from peftlab.train.fused_loss import fused_causal_lm_loss
    from peftlab.train.step import accumulate_gradients

    galore = setting.get("galore")
    if setting.get("quant"):
        from peftlab.quant.bnb import prepare_for_kbit_training

        prepare_for_kbit_training(model)
    if galore:
        from peftlab.train.galore import GaloreConfig, attach_full, make_optimizer

        attach_full(model, GaloreConfig(rank=galore))
        opt = make_optimizer(model, GaloreConfig(rank=galore), lr=1e-5)
    else:
        peftlab.attach(model, peftlab.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
        params = [p for p in model.parameters() if p.requires_grad]
        if setting.get("quant") and os.environ.get("PEFTLAB_BENCH_OPTIM") == "paged_adamw_fused":
            from peftlab.train.paged import PagedAdamWFused  # A/B: one fused update, no sync per parameter

            opt = PagedAdamWFused(params, lr=1e-4)
        elif setting.get("quant"):
            import bitsandbytes as bnb

            opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4)
        else:
            opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    loss_fn = fused_causal_lm_loss if setting.get("fused_ce", True) else None
    backend = os.environ.get("PEFTLAB_BENCH_COMPILE")  # A/B: compiled decoder layers (also over 4-bit, checkpointed)
    if backend:
        from peftlab.train.packing import compile_model

        model.config.use_cache = False
        mode = os.environ.get("PEFTLAB_BENCH_COMPILE_MODE") or None  # A/B: "reduce-overhead" (CUDA graphs per layer)
        compile_model(model, backend, "layers", mode=mode)

    def step(batch):
        loss, _ = accumulate_gradients(model, [batch], device, loss_fn=loss_fn)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, opt


def _peft_step_fn(model, setting: dict, device):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT's preparation reads it
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)
    return step, opt


def _adamw_full_step_fn(model, setting: dict, device):
    """Full fine-tuning with torch AdamW under the same checkpointing: GaLore's reference."""
    import torch

    from peftlab.train.step import accumulate_gradients

    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step(batch):
        loss, _ = accumulate_gradients(model, [batch], device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, opt


def run_curve(name: str, impl: str, device_name: str, smoke: bool, lr: float | None = None) -> dict[str, Any]:
    """Loss curve of GaLore (impl peftlab) or AdamW (impl adamw) training a small Llama on chitchat bytes;
    `lr` replaces that optimizer's learning rate in CURVE (a learning-rate sweep)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.defaults import default_records
    from peftlab.train.frugal import optimizer_state_bytes
    from peftlab.train.galore import GaloreConfig, make_optimizer
    from peftlab.train.step import accumulate_gradients

    device = torch.device(device_name)
    spec = dict(CURVE)
    if smoke:
        spec.update(model=dict(SHAPES["tiny"], vocab_size=256), steps=3, batch=2, seq=32)
    if lr is not None:
        spec["galore_lr" if impl in ("peftlab", "adamw_galore_lrs") else "adamw_lr"] = lr
    text = "\n".join(m["content"] for r in default_records(limit=2000) for m in r["messages"])
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**spec["model"], attn_implementation="sdpa"))
    model.train()
    if impl == "peftlab":
        config = GaloreConfig(rank=SETTINGS[name]["galore"], update_proj_gap=spec["update_proj_gap"],
                              scale=spec["galore_scale"])
        opt = make_optimizer(model, config, lr=spec["galore_lr"])
    elif impl == "adamw_galore_lrs":  # AdamW at GaLore's per-group rates: projected weights lr * scale, the rest lr
        from peftlab.train.galore import projected_parameters

        projected = {id(p) for p in projected_parameters(model)}
        opt = torch.optim.AdamW([
            {"params": [p for p in model.parameters() if id(p) not in projected], "lr": spec["galore_lr"]},
            {"params": [p for p in model.parameters() if id(p) in projected], "lr": spec["galore_lr"] * spec["galore_scale"]}])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=spec["adamw_lr"])
    generator = torch.Generator().manual_seed(1)  # the same batches for both
    losses, started = [], time.perf_counter()
    for _ in range(spec["steps"]):
        starts = torch.randint(0, len(data) - spec["seq"] - 1, (spec["batch"],), generator=generator)
        ids = torch.stack([data[i:i + spec["seq"]] for i in starts.tolist()]).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss, _ = accumulate_gradients(model, [batch], device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 4))
    tail = losses[-20:]
    return {"setting": name, "impl": impl, "optimizer": {"peftlab": "galore"}.get(impl, "adamw"),
            "steps": spec["steps"], "losses": losses, "final_loss": round(sum(tail) / len(tail), 4),
            "optimizer_state_bytes": optimizer_state_bytes(opt),
            "train_s": round(time.perf_counter() - started, 1), "spec": spec}


def run_child(name: str, impl: str, device_name: str, smoke: bool, steps: int, warmup: int,
              seq: int | None = None, curve_lr: float | None = None) -> dict[str, Any]:
    import torch

    from peftlab.train.activations import checkpointing, compiled_placement
    from peftlab.train.embeddings import host_embeddings
    from peftlab.train.frugal import optimizer_state_bytes

    setting = SETTINGS[name]
    if setting.get("curve"):
        return run_curve(name, impl, device_name, smoke, curve_lr)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model = _base(setting, device, smoke)
    load_s = time.perf_counter() - t0
    offload = contextlib.ExitStack()  # held until the process ends
    if setting.get("embed_offload"):
        model.requires_grad_(False)  # the base is frozen anyway once the adapter is attached
        offload.enter_context(host_embeddings(model, True))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    after_load = torch.cuda.memory_allocated() / 2**30 if cuda else None
    build = {"peftlab": _peftlab_step_fn, "peft": _peft_step_fn, "adamw": _adamw_full_step_fn}[impl]
    step, opt = build(model, setting, device)
    model.train()
    batch_size, seq = (2, 32) if smoke else (setting["batch"], seq or 1024)
    vocab = model.config.vocab_size
    ids = torch.randint(0, min(vocab, 128000), (batch_size, seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    own_ckpt = impl != "peft" and setting["ckpt"] != "off"
    # the last blocks left out of the checkpointing (TrainArgs.checkpoint_keep); PEFTLAB_BENCH_KEEP overrides
    keep = int(os.environ.get("PEFTLAB_BENCH_KEEP") or setting.get("keep", 0)) if own_ckpt else 0
    samples, loss = [], None
    with checkpointing(model, setting["ckpt"] if own_ckpt else "off", keep_last=keep):
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            loss = step(batch)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                samples.append((time.perf_counter() - started) * 1e3)
        profile_to = os.environ.get("PEFTLAB_BENCH_PROFILE")  # a path prefix: torch.profiler's table of 2 more steps
        profile_path = Path(f"{profile_to}.{name}.txt") if profile_to and impl == "peftlab" else None
        if profile_path is not None:
            from train_step import profile_table

            profile_path.write_text(profile_table(lambda: step(batch), cuda, 2) + "\n")
    record = {"setting": name, "impl": impl, "batch": batch_size, "seq": seq, "load_s": round(load_s, 1),
              "checkpointing": setting["ckpt"], "ckpt_keep": keep, "embed_offload": bool(setting.get("embed_offload")),
              "fused_ce": impl == "peftlab" and setting.get("fused_ce", True),
              "compiled": os.environ.get("PEFTLAB_BENCH_COMPILE") if impl == "peftlab" else None,
              "compile_mode": os.environ.get("PEFTLAB_BENCH_COMPILE_MODE") or None,
              "torch_dequant": (impl == "peftlab" and bool(setting.get("quant")) and bool(os.environ.get(
                  "PEFTLAB_BENCH_COMPILE")) and os.environ.get("PEFTLAB_TORCH_DEQUANT", "1") != "0"),
              "dequant_kernel": (impl == "peftlab" and bool(setting.get("quant")) and not os.environ.get(
                  "PEFTLAB_BENCH_COMPILE") and os.environ.get("PEFTLAB_DEQUANT_KERNEL", "") != "0"),
              "ckpt_reentrant": (impl == "peftlab" and setting["ckpt"] != "off"
                                 and os.environ.get("PEFTLAB_CKPT_REENTRANT", "1") != "0"),
              "ckpt_joint": (impl == "peftlab" and setting["ckpt"] != "off" and bool(os.environ.get(
                  "PEFTLAB_BENCH_COMPILE")) and os.environ.get("PEFTLAB_CKPT_JOINT", "") != "0"),  # by default since
              # the nineteenth session, where it applies (compiled blocks; peftlab/train/activations.py _specials)
              "optimizer": type(opt).__name__,
              "ckpt_placement": (compiled_placement() if impl == "peftlab" and own_ckpt
                                 and os.environ.get("PEFTLAB_BENCH_COMPILE") else None),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "optimizer_state_bytes": optimizer_state_bytes(opt), "final_loss": round(float(loss), 4),
              "step_ms_samples": [round(s, 2) for s in samples], "step_ms": round(statistics.median(samples), 2),
              "profile": None if profile_path is None else str(profile_path)}
    if cuda:
        record.update(after_load_gib=round(after_load, 3),
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))
    return record
