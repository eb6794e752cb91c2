#!/usr/bin/env bash
# Prepared in the ninth session (2026-12-04), not yet run: one H200 call, <= ~9 min.
# DoRA, HRA and BOFT measured 1.52x / 1.74x / 1.75x our compiled LoRA on the H200 (2026-12-04, one process each),
# while on the CPU proxy their compiled host time per step is LoRA's or less (bench/train_overhead.py, same day:
# LoRA 28.2 ms, HRA 25.8, BOFT 29.2, DoRA 26.0; bench/results/train_overhead_methods_compiled_cpu.json): the gap is
# device work. This profiles each compiled step (torch.profiler table per configuration) beside LoRA's, and IA3 /
# VeRA beside the compiled frozen base.  OUT=... bench/gpu/methods_profile.sh -> $OUT/methods_profile.{json,profile.txt}
set -x
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 560 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --prime 0 --timeout 70 \
  --methods lora,dora,hra,boft_f1,frozen_compiled,ia3,vera --impls peftlab_compiled --profile \
  --out "$OUT/methods_profile.json" 2>&1 | grep -E '^\[|rror'
exit 0
