#!/usr/bin/env bash
# Nineteenth session (2026-12-06), for a call at the end of the device budget: issue 13's 1B offloaded row as the
# trainer now runs it (the joint recompute by default: no PEFTLAB_CKPT_JOINT), then Unsloth's beside it; then, while
# the call has time, LoRA (the split add, default since the twentieth session) beside Unsloth without checkpointing.
# Twentieth session: Unsloth's row ran past its 65 s (it loads and patches for ~60 s; now 115 s) and the LoRA row
# past its 55 s. Twenty-first and twenty-second sessions: Unsloth's offloaded row ran past 115 s twice (it also writes
# the random model's files; the second time on a warm machine): now 280 s, and the LoRA row (measured beside Unsloth
# in both) runs only with LORA=1. <= ~6 min, carry .unsloth_site.
#   -> $OUT/offload_default.json, offload_unsloth.json (, lora.json)
set -x
OUT=${OUT:-/tmp/confirm13}
source bench/gpu/unsloth_env.sh
env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_OPTIM=paged_adamw_fused timeout 60 python3 bench/memory.py \
  --steps 10 --warmup 4 --timeout 55 --impls peftlab --settings 1b-lora-ckpt-offload \
  --out "$OUT/offload_default.json" >> "$OUT/log.txt" 2>&1
timeout 290 python3 bench/memory.py --steps 10 --warmup 1 --timeout 280 --impls unsloth --settings 1b-lora-ckpt-offload \
  --out "$OUT/offload_unsloth.json" >> "$OUT/log.txt" 2>&1
grep -E '^\{' "$OUT/log.txt" | cut -c1-300
[ "${LORA:-0}" = 1 ] && timeout 240 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 --warmup 3 \
  --repeats 1 --shape 1b --methods lora --impls peftlab_compiled,unsloth --prime 0 --timeout 110 --out "$OUT/lora.json" \
  2>&1 | grep -E '^\[|rror'
exit 0
