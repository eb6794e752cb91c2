"""Memory-frugal training: peak memory and step time of peftlab and its peers, side by side in one run.

    python bench/memory.py                                  # every setting, peftlab + PEFT (GPU)
    python bench/memory.py --settings 8b-qlora-b4 --impls peftlab,peft,unsloth
    python bench/memory.py --smoke                          # tiny shapes on CPU, in-process (the test)
    python bench/memory.py --table bench/results/memory/X.json

Settings (random-weight Llama shapes, LoRA r16 alpha 32 on q/k/v/o/gate/up/down, T 1024):
  8b-qlora-b1 / -b4      QLoRA nf4 + double quant, bf16 compute, checkpointing, paged AdamW 32-bit
  (8b-qlora-b4-offload   the same for peftlab with offloaded checkpointing).
                         peftlab: streamed 4-bit load, its own checkpointing, fused CE. PEFT: the steps
                         of /work/shared/anchors/peft_qlora_baseline.py (prepare_model_for_kbit_training,
                         get_peft_model, transformers' reentrant checkpointing, PagedAdamW32bit) on the
                         same quantized modules (loaded by the same streaming code; ``is_loaded_in_4bit`` set
                         as transformers sets it). Unsloth: FastLanguageModel as its users run it.
  1b-lora-ckpt-off|on|offload   bf16 LoRA B4 with checkpointing off / on / offloaded (peftlab; Unsloth with
                         its offloaded checkpointing beside offload), fused CE on.
  1b-lora-offload-nofused       as 1b-lora-ckpt-offload with the fused cross-entropy off.
  70b-qlora-b1           70B shape, nf4 + double quant, B1, offloaded checkpointing, fused CE (peftlab only):
                         random weights generated and quantized tensor by tensor on the GPU.
  1b-galore-r128         full-parameter GaLore rank 128 vs plain AdamW: optimizer state bytes, peak, time.
  galore-curve           GaLore rank 128 vs AdamW loss curves over 200 steps on a small real task (CURVE).

Each (setting, implementation) runs in its own subprocess (its peak memory is its own; a crash or an
out-of-memory is recorded, not fatal). Unsloth must be imported before transformers and needs a
checkpoint on disk: its child writes one under $TMPDIR first; when unsloth is not importable the row
says so. Step protocol as the anchors: forward with labels, backward, optimizer step, zero_grad,
synchronise; median over --steps after --warmup. Peak = torch.cuda.max_memory_allocated() from after
the load on. Env switches for peftlab rows: PEFTLAB_BENCH_COMPILE=inductor compiles the decoder layers;
PEFTLAB_BENCH_PROFILE=PREFIX writes torch.profiler's table of two more steps to PREFIX.<setting>.txt.
Compiled 4-bit rows dequantize with peftlab's torch form (peftlab/quant/dequant.py); PEFTLAB_TORCH_DEQUANT=0 keeps
bitsandbytes' kernels there (recorded as ``torch_dequant``). Eager 4-bit rows on CUDA dequantize with peftlab's
Triton kernel (peftlab/quant/dequant_triton.py); PEFTLAB_DEQUANT_KERNEL=0 keeps bitsandbytes' (``dequant_kernel``).
peftlab's checkpointing takes the lean block node (peftlab/train/recompute.py) where it may;
PEFTLAB_CKPT_REENTRANT=0 keeps torch's (recorded as ``ckpt_reentrant``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import competitors  # noqa: E402  (the random checkpoint Unsloth loads, shared with train_step.py)
from train_step import SHAPES as STEP_SHAPES, environment  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {name: STEP_SHAPES[name]["model"] for name in ("tiny", "1b", "8b")}
SHAPES["70b"] = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False)
SETTINGS: dict[str, dict[str, Any]] = {
    "8b-qlora-b1": dict(shape="8b", quant="nf4", batch=1, ckpt="on", impls=("peftlab", "peft", "unsloth")),
    "8b-qlora-b4": dict(shape="8b", quant="nf4", batch=4, ckpt="on", impls=("peftlab", "peft", "unsloth")),
    "8b-qlora-b4-offload": dict(shape="8b", quant="nf4", batch=4, ckpt="offload", impls=("peftlab",),
                                peer="8b-qlora-b4"),  # the table compares it with that setting's other rows
    # + the frozen input embedding table in host memory (TrainArgs.offload_embeddings): 1.0 GB at this shape
    "8b-qlora-b1-embed": dict(shape="8b", quant="nf4", batch=1, ckpt="on", embed_offload=True, impls=("peftlab",),
                              peer="8b-qlora-b1"),
    "8b-qlora-b4-embed": dict(shape="8b", quant="nf4", batch=4, ckpt="on", embed_offload=True, impls=("peftlab",),
                              peer="8b-qlora-b4"),
    "8b-qlora-b4-offload-embed": dict(shape="8b", quant="nf4", batch=4, ckpt="offload", embed_offload=True,
                                      impls=("peftlab",), peer="8b-qlora-b4"),
    "1b-lora-ckpt-off": dict(shape="1b", batch=4, ckpt="off", impls=("peftlab",)),
    "1b-lora-ckpt-on": dict(shape="1b", batch=4, ckpt="on", impls=("peftlab",)),
    "1b-lora-ckpt-offload": dict(shape="1b", batch=4, ckpt="offload", impls=("peftlab", "unsloth")),
    "1b-lora-offload-nofused": dict(shape="1b", batch=4, ckpt="offload", fused_ce=False, impls=("peftlab",)),
    "70b-qlora-b1": dict(shape="70b", quant="nf4", batch=1, ckpt="offload", impls=("peftlab",), steps=3, warmup=1),
    "1b-galore-r128": dict(shape="1b", batch=4, ckpt="on", galore=128, impls=("peftlab", "adamw")),
    "galore-curve": dict(curve=True, galore=128, impls=("peftlab", "adamw", "adamw_galore_lrs")),
}
# galore-curve: a 8-layer, hidden-512 Llama trained from scratch on chitchat text as bytes (a small real
# task), GaLore rank 128 (lr 4e-3, scale 0.25, projection refreshed every 50 steps) vs AdamW (lr 1e-3),
# 200 steps of 16 x 256 bytes; the final loss is the mean of the last 20 steps. Impl adamw_galore_lrs: AdamW with
# GaLore's effective rates (the projected weights at galore_lr * galore_scale, every other parameter at galore_lr).
CURVE = dict(model=dict(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512),
             steps=200, batch=16, seq=256, galore_lr=4e-3, galore_scale=0.25, adamw_lr=1e-3, update_proj_gap=50)
DEFAULT_SETTINGS = [s for s in SETTINGS if s != "70b-qlora-b1"] + ["70b-qlora-b1"]  # the longest last


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
    samples, loss = [], None
    with checkpointing(model, setting["ckpt"] if own_ckpt else "off"):
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
              "checkpointing": setting["ckpt"], "embed_offload": bool(setting.get("embed_offload")),
              "fused_ce": impl == "peftlab" and setting.get("fused_ce", True),
              "compiled": os.environ.get("PEFTLAB_BENCH_COMPILE") if impl == "peftlab" else None,
              "compile_mode": os.environ.get("PEFTLAB_BENCH_COMPILE_MODE") or None,
              "torch_dequant": (impl == "peftlab" and bool(setting.get("quant")) and bool(os.environ.get(
                  "PEFTLAB_BENCH_COMPILE")) and os.environ.get("PEFTLAB_TORCH_DEQUANT", "1") != "0"),
              "dequant_kernel": (impl == "peftlab" and bool(setting.get("quant")) and not os.environ.get(
                  "PEFTLAB_BENCH_COMPILE") and os.environ.get("PEFTLAB_DEQUANT_KERNEL", "") != "0"),
              "ckpt_reentrant": (impl == "peftlab" and setting["ckpt"] != "off"
                                 and os.environ.get("PEFTLAB_CKPT_REENTRANT", "1") != "0"),
              "ckpt_clone_outputs": os.environ.get("PEFTLAB_CKPT_CLONE_OUTPUTS", "") == "1",
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


UNSLOTH_CHILD = r'''
import json, os, statistics, sys, time
name, shape_json, batch, gc_mode, q4, ckpt = sys.argv[1:7]
import unsloth  # noqa: F401  (patches transformers; must come first)
from unsloth import FastLanguageModel
import torch
model, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=1024, dtype=torch.bfloat16, load_in_4bit=q4 == "1")
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none", random_state=0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing={"1": True}.get(gc_mode, gc_mode))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
if q4 == "1":
    import bitsandbytes as bnb
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4)
else:
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
x = torch.randint(0, 128000, (int(batch), 1024), device="cuda")
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
samples = []
for i in range(13):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out = model(input_ids=x, labels=x); out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if i >= 3: samples.append((time.perf_counter() - t0) * 1e3)
print("RESULT " + json.dumps({"setting": name, "impl": "unsloth", "unsloth": unsloth.__version__, "batch": int(batch),
      "seq": 1024, "checkpointing": gc_mode, "step_ms_samples": [round(s, 2) for s in samples],
      "step_ms": round(statistics.median(samples), 2), "final_loss": round(float(out.loss), 4),
      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}))
'''


def run_unsloth(name: str, timeout: int) -> dict[str, Any]:
    setting = SETTINGS[name]
    probe = subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return {"setting": name, "impl": "unsloth", "error": "unsloth not importable: "
                + (probe.stderr.strip().splitlines() or ["?"])[-1][:300]}
    folder = Path(tempfile.gettempdir()) / f"peftlab-rand-llama-{setting['shape']}"
    competitors.random_checkpoint(SHAPES[setting["shape"]], folder, timeout=timeout)
    gc_mode = {"off": "0", "on": "1", "offload": "unsloth"}[setting["ckpt"]]
    proc = subprocess.run([sys.executable, "-c", UNSLOTH_CHILD, name, "", str(setting["batch"]), gc_mode,
                           "1" if setting.get("quant") else "0", str(folder)],
                          capture_output=True, text=True, timeout=timeout)
    return _parse_child(proc, name, "unsloth")


def _parse_child(proc, name: str, impl: str) -> dict[str, Any]:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = any("OutOfMemory" in t or "out of memory" in t for t in tail)
    return {"setting": name, "impl": impl, "error": "OOM" if oom else " | ".join(tail)[-600:]}


def run_one(name: str, impl: str, args) -> dict[str, Any]:
    setting = SETTINGS[name]
    steps = setting.get("steps", args.steps)
    warmup = setting.get("warmup", args.warmup)
    if impl == "unsloth":
        if args.smoke or args.device == "cpu":
            return {"setting": name, "impl": "unsloth", "error": "skipped: Unsloth needs a CUDA GPU"}
        return run_unsloth(name, args.timeout)
    if args.inline:
        return run_child(name, impl, args.device, args.smoke, steps, warmup, args.seq, args.curve_lr)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-impl", impl,
           "--device", args.device, "--steps", str(steps), "--warmup", str(warmup)] + (["--smoke"] if args.smoke else []) \
        + (["--seq", str(args.seq)] if args.seq else []) + (["--curve-lr", str(args.curve_lr)] if args.curve_lr else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"setting": name, "impl": impl, "error": f"timeout after {args.timeout} s"}
    return _parse_child(proc, name, impl)


def run_driver(args) -> Path:
    names = args.settings.split(",") if args.settings else DEFAULT_SETTINGS
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise SystemExit(f"unknown setting(s) {bad}; known: {sorted(SETTINGS)}")
    wanted = set(args.impls.split(",")) if args.impls else None
    env = environment(args.device)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "memory" / (
        f"memory_{'smoke' if args.smoke else (env.get('gpu') or 'cpu').replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "memory", "environment": env, "smoke": args.smoke,
                "args": {k: v for k, v in vars(args).items() if k not in ("child", "child_impl", "table")},
                "settings": {n: SETTINGS[n] for n in names}, "results": []}
    for name in names:
        for impl in SETTINGS[name]["impls"]:
            if wanted is not None and impl not in wanted and not (impl == "adamw" and "peftlab" in wanted):
                # (AdamW is the baseline of GaLore's peftlab rows)
                continue
            record = run_one(name, impl, args)
            print(json.dumps({k: v for k, v in record.items() if k != "step_ms_samples"}), flush=True)
            document["results"].append(record)
            _write(out, document)  # after every record: a run cut short keeps what it measured
    _write(out, document)
    print(f"results: {out}")
    return out


def _write(path: Path, document: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def markdown_table(document: dict[str, Any]) -> str:
    """One row per setting: each implementation's step ms / peak GiB, and peftlab's ratios to the others (for a
    variant setting with a ``peer``, to the peer setting's other implementations, named in the ratio)."""
    by_setting: dict[str, dict[str, dict]] = {}
    for record in document["results"]:
        by_setting.setdefault(record["setting"], {})[record["impl"]] = record
    peers = {name: SETTINGS.get(name, {}).get("peer") for name in by_setting}
    impls = [i for i in ("peftlab", "peft", "unsloth", "adamw", "adamw_galore_lrs")
             if any(i in v for v in by_setting.values())]
    env = document["environment"]
    lines = [f"{env.get('gpu') or env.get('cpu')}, torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, commit {str(env.get('commit'))[:10]}" + (" (smoke run)" if document.get("smoke") else ""),
             "", "| setting | " + " | ".join(f"{i} step ms / peak GiB" for i in impls) + " | peftlab vs others |",
             "|---|" + "---|" * (len(impls) + 1)]
    for name, rows in by_setting.items():
        cells, ratios = [], []
        ours = rows.get("peftlab", {})
        peer_rows = by_setting.get(peers[name] or "", {})
        for impl in impls:
            r = rows.get(impl)
            if r is None:
                cells.append("")
                r = peer_rows.get(impl) if impl != "peftlab" else None
                if r is not None and "step_ms" in r and "step_ms" in ours:
                    ratios.append(f"{impl} ({peers[name]}): {ours['step_ms'] / r['step_ms']:.2f}x time"
                                  + (f", {ours['peak_gib'] / r['peak_gib']:.2f}x memory"
                                     if r.get("peak_gib") and ours.get("peak_gib") else ""))
            elif "error" in r:
                cells.append(r["error"][:40])
            elif "losses" in r:  # a loss curve: final loss (mean of the last 20 steps)
                cells.append(f"final loss {r['final_loss']:.4f} after {r['steps']} steps")
                if impl != "peftlab" and "final_loss" in ours:
                    ratios.append(f"{impl}: final loss {ours['final_loss'] / r['final_loss']:.3f}x")
            else:
                peak = r.get("peak_gib")
                state = r.get("optimizer_state_bytes")
                extra = f" (opt state {state / 2**30:.2f} GiB)" if state and SETTINGS.get(name, {}).get("galore") else ""
                cells.append(f"{r['step_ms']:.1f} / {peak:.2f}{extra}" if peak is not None
                             else f"{r['step_ms']:.1f} / n/a{extra}")
                if impl != "peftlab" and "step_ms" in ours:
                    text = f"{impl}: {ours['step_ms'] / r['step_ms']:.2f}x time"
                    if peak and ours.get("peak_gib"):
                        text += f", {ours['peak_gib'] / peak:.2f}x memory"
                    if extra and ours.get("optimizer_state_bytes"):
                        text += f", {ours['optimizer_state_bytes'] / state:.2f}x optimizer state"
                    ratios.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + "; ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def _read_tables(spec: str) -> dict[str, Any]:
    """One results file, or several joined by "+" (files of one device call: the first one's environment, all
    their rows)."""
    documents = [json.loads(Path(path).read_text()) for path in spec.split("+")]
    merged = dict(documents[0])
    merged["results"] = [record for document in documents for record in document["results"]]
    return merged


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", help=f"comma-separated (default: all): {', '.join(SETTINGS)}")
    p.add_argument("--impls", help="comma-separated subset of peftlab,peft,unsloth (default: each setting's own)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=int, default=300, help="seconds per (setting, implementation)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, in-process, CPU unless --device says")
    p.add_argument("--seq", type=int, help="sequence length (default 1024); short ones measure state sizes on a CPU")
    p.add_argument("--curve-lr", type=float, help="galore-curve: this learning rate for the optimizer run "
                   "(default: CURVE's galore_lr / adamw_lr)")
    p.add_argument("--inline", action="store_true", help="run every configuration in this process")
    p.add_argument("--out", help="results JSON path (default: bench/results/memory/memory_<gpu>.json)")
    p.add_argument("--table", metavar="RESULTS_JSON", help="print the markdown table of a results file (or of "
                   "several from one call, joined by '+') and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.inline, args.steps, args.warmup = True, min(args.steps, 2), min(args.warmup, 1)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(_read_tables(args.table)), end="")
        return
    if args.child:
        record = run_child(args.child, args.child_impl, args.device, args.smoke, args.steps, args.warmup, args.seq,
                           args.curve_lr)
        print("RESULT " + json.dumps(record), flush=True)
        return
    run_driver(args)


if __name__ == "__main__":
    main()
