#!/usr/bin/env bash
# Thirty-first session (2026-12-07), carry .gpu_liger, <= ~9 min. Issue 14's memory rows that are still over PEFT +
# Liger's (prompt tuning 1.01x, prefix tuning 1.01x, LLaMA-Adapter 1.03x): their peak sits in the fused loss's forward
# (one chunk of logits alive). Same call: each beside PEFT + Liger and the frozen base with the default chunks (256
# MiB budget: 512 rows, 125 MiB of bf16 logits), then ours and the frozen base with half the budget (256 rows,
# PEFTLAB_CE_CHUNK_MIB=128), to see what the smaller chunk takes off the peak and costs in time.
#   -> $OUT/liger_default.json, $OUT/liger_chunk128.json
set -x
OUT=${OUT:-/tmp/queue31c}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
timeout 330 python3 bench/train_step.py --shape 1b --methods prompt_tuning,prefix_tuning,adaption_prompt,frozen_compiled \
  --impls peftlab_compiled,peft_liger --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 75 \
  --out "$OUT/liger_default.json" 2>&1 | grep -E '^\[|rror|kip'
env PEFTLAB_CE_CHUNK_MIB=128 timeout 230 python3 bench/train_step.py --shape 1b \
  --methods prompt_tuning,prefix_tuning,adaption_prompt,frozen_compiled --impls peftlab_compiled --steps 10 --warmup 3 \
  --repeats 1 --prime 0 --timeout 75 --out "$OUT/liger_chunk128.json" 2>&1 | grep -E '^\[|rror|kip'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
