#!/usr/bin/env bash
# Nineteenth session (2026-12-06), for a call at the end of the device budget: issue 13's 1B offloaded row as the
# trainer now runs it (the joint recompute by default: no PEFTLAB_CKPT_JOINT), then Unsloth's beside it; then, while
# the call has time, one LoRA row with the expand product added apart (PEFTLAB_MM_ADD_SPLIT=1).
# <= ~2 min (the LoRA row ~40 s more), carry .unsloth_site.   -> $OUT/offload_default.json, offload_unsloth.json, split.json
set -x
OUT=${OUT:-/tmp/confirm13}
source bench/gpu/unsloth_env.sh
env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_OPTIM=paged_adamw_fused timeout 60 python3 bench/memory.py \
  --steps 10 --warmup 4 --timeout 55 --impls peftlab --settings 1b-lora-ckpt-offload \
  --out "$OUT/offload_default.json" >> "$OUT/log.txt" 2>&1
timeout 70 python3 bench/memory.py --steps 10 --warmup 1 --timeout 65 --impls unsloth --settings 1b-lora-ckpt-offload \
  --out "$OUT/offload_unsloth.json" >> "$OUT/log.txt" 2>&1
grep -E '^\{' "$OUT/log.txt" | cut -c1-300
env PEFTLAB_MM_ADD_SPLIT=1 timeout 60 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b \
  --methods lora --impls peftlab_compiled --prime 0 --timeout 55 --out "$OUT/split.json" 2>&1 | grep -E '^\[|rror'
exit 0
