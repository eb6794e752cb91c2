#!/usr/bin/env bash
# Twenty-first session (2026-12-06): the fused loss's chunk. Our row-kernel path keeps a chunk of ~523 rows of bf16
# logits (128 MiB at vocab 128256); Liger's is ~128 rows (~32 MiB). Prompt tuning peaks at 1.04x PEFT + Liger's
# memory. Prompt tuning and LoRA with PEFTLAB_CE_CHUNK_MIB=256 (the default) and 64 (~32 MiB of bf16 logits),
# alternating in four processes each, timed: does the smaller chunk lower the peak, and what does it cost?
# One call, <= ~6 min, nothing carried.   -> $OUT/ce_<mib>_<round>.json
set -x
OUT=${OUT:-/tmp/ce-chunk}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for round in 1 2; do
  for mib in 256 64; do
    env PEFTLAB_CE_CHUNK_MIB=$mib timeout 170 python3 bench/train_step.py --shape 1b --methods prompt_tuning,lora \
      --impls peftlab_compiled --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 80 \
      --out "$OUT/ce_${mib}_${round}.json" 2>&1 | grep -E '^\[|rror'
  done
done
exit 0
