#!/usr/bin/env bash
# Issue 14/13: peftlab with compiled decoder layers (alone and with the lean nodes inside them) vs HF PEFT vs
# Unsloth, side by side: 1b LoRA and DoRA (B4 x 1024), then 8b LoRA (B2 x 1024). ~9 min on one H200.
#   OUT=... bench/gpu/speed_compiled.sh      (carry .unsloth_site; UNSLOTH_SITE overrides the path)
# Writes $OUT/speed_compiled_1b.json, $OUT/speed_compiled_8b.json and their logs.
set -x
OUT=${OUT:-bench/results/gpu}
SITE=${UNSLOTH_SITE:-$PWD/.unsloth_site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
timeout 300 python3 bench/train_step.py --shape 1b --methods lora,dora \
  --impls peftlab_compiled,peftlab_compiled_lean,peft,unsloth --unsloth-site "$SITE" --steps 10 --warmup 3 \
  --repeats 1 --prime 1 --timeout 110 --out "$OUT/speed_compiled_1b.json" > "$OUT/speed_compiled_1b.log" 2>&1 \
  || echo "1b comparison stopped early (see the log)"
timeout 250 python3 bench/train_step.py --shape 8b --methods lora \
  --impls peftlab_compiled,peft,unsloth --unsloth-site "$SITE" --steps 10 --warmup 3 \
  --repeats 1 --prime 0 --timeout 120 --out "$OUT/speed_compiled_8b.json" > "$OUT/speed_compiled_8b.log" 2>&1 \
  || echo "8b comparison stopped early (see the log)"
tail -n 12 "$OUT/speed_compiled_1b.log" "$OUT/speed_compiled_8b.log"
exit 0
