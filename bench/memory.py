"""Memory-frugal training: peak memory and step time of peftlab and its peers, side by side in one run.

    python bench/memory.py                                  # every setting, peftlab + PEFT (GPU)
    python bench/memory.py --settings 8b-qlora-b4 --impls peftlab,peft,unsloth
    python bench/memory.py --smoke                          # tiny shapes on CPU, in-process (the test)
    python bench/memory.py --table bench/results/memory/X.json

Settings (random-weight Llama shapes, LoRA r16 alpha 32 on q/k/v/o/gate/up/down, T 1024):
  8b-qlora-b1 / -b4      QLoRA nf4 + double quant, bf16 compute, checkpointing, paged AdamW 32-bit
  (8b-qlora-b4-offload   the same for peftlab with offloaded checkpointing; -offload-embed: + the input
                         embedding table in host memory; -offload-embed-keep2: + the last 2 blocks not checkpointed).
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
PEFTLAB_CKPT_REENTRANT=0 keeps torch's (recorded as ``ckpt_reentrant``). PEFTLAB_BENCH_KEEP=N leaves the last N
blocks out of the checkpointing (``ckpt_keep``; TrainArgs.checkpoint_keep), over the setting's own ``keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import competitors  # noqa: E402  (the random checkpoint Unsloth loads, shared with train_step.py)
from train_step import environment  # noqa: E402

# the settings, the child's step and the table live beside this file
from memory_child import run_child  # noqa: E402
from memory_settings import DEFAULT_SETTINGS, SETTINGS, SHAPES  # noqa: E402
from memory_table import _read_tables, markdown_table  # noqa: E402

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
