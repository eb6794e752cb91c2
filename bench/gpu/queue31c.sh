#!/usr/bin/env bash
# Thirty-first session (2026-12-07), carry .gpu_liger, <= ~9.5 min. Issue 14's memory rows still over PEFT + Liger's
# (prompt tuning 1.01x, LLaMA-Adapter 1.03x): prompt tuning's peak sits in the fused loss's forward (one chunk of
# logits alive). Same call: each beside PEFT + Liger and the frozen base with the default chunks (256 MiB budget:
# 512 rows, 125 MiB of bf16 logits), then ours and the frozen base with 256 rows (PEFTLAB_CE_CHUNK_MIB=128) and 128
# rows (=64), to see what smaller chunks take off the peak and cost in time (the frozen base uses the same loss).
#   -> $OUT/liger_default.json, $OUT/chunk128.json, $OUT/chunk64.json
set -x
OUT=${OUT:-/tmp/queue31c}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
C=(--shape 1b --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 75)
timeout 250 python3 bench/train_step.py "${C[@]}" --methods prompt_tuning,adaption_prompt,frozen_compiled \
  --impls peftlab_compiled,peft_liger --out "$OUT/liger_default.json" 2>&1 | grep -E '^\[|rror|kip'
for MIB in 128 64; do
  env PEFTLAB_CE_CHUNK_MIB=$MIB timeout 150 python3 bench/train_step.py "${C[@]}" \
    --methods prompt_tuning,adaption_prompt,frozen_compiled --impls peftlab_compiled --out "$OUT/chunk$MIB.json" \
    2>&1 | grep -E '^\[|rror|kip'
done
chmod 644 "$OUT"/* 2>/dev/null
exit 0
