#!/usr/bin/env bash
# Thirty-fourth session (2026-12-07), nothing carried, <= ~9.5 min: the prefix A/B (with the frozen base,
# two runs each) then, while the call has time, queue36.sh's addmm A/B for LoRA and VeRA only (two runs each)
# -> $OUT/prefix.json, $OUT/addmm.json and their tables
set -x
OUT=${OUT:-/tmp/queue38}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 90 python3 -m pytest -q tests/test_prefix_attention.py 2>&1 | tail -3
timeout 240 python3 bench/train_step.py --shape 1b --methods prefix_tuning,frozen_compiled \
  --impls peftlab_compiled,peftlab_compiled_sdpa_mask --steps 10 --warmup 3 --repeats 2 --prime 0 --timeout 60 \
  --out "$OUT/prefix.json" 2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/prefix.json" > "$OUT/prefix_table.md" 2>&1
left=$(( ${DEADLINE:-560} - SECONDS ))
[ "$left" -gt 90 ] && timeout "$left" python3 bench/train_step.py --shape 1b --methods lora,vera \
  --impls peftlab_compiled,peftlab_compiled_addmm --steps 10 --warmup 3 --repeats 2 --prime 0 --timeout 60 \
  --out "$OUT/addmm.json" 2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/addmm.json" > "$OUT/addmm_table.md" 2>&1
chmod 644 "$OUT"/* 2>/dev/null
exit 0
