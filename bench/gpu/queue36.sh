#!/usr/bin/env bash
# Thirty-third session (2026-12-07), nothing carried, <= ~9.5 min: the post-grad pass that takes inductor's
# addmm(mm(u, v), x, w) in place (peftlab/ops/mm_add.py addmm_in_place, off by default; impl peftlab_compiled_addmm:
# PEFTLAB_ADDMM_IN_PLACE=1) against the default compiled layers, 1B LoRA, DoRA, VeRA and the frozen base, two runs of
# each in alternating order -> $OUT/addmm.json; then, while the call has time, LoRA and VeRA with the pass and
# profiles (the memcpy128 rows should be gone) -> $OUT/addmm_prof.json (+ .profile.txt)
set -x
OUT=${OUT:-/tmp/queue36}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 420 python3 bench/train_step.py --shape 1b --methods lora,dora,vera,frozen_compiled \
  --impls peftlab_compiled,peftlab_compiled_addmm --steps 10 --warmup 3 --repeats 2 --prime 0 --timeout 80 \
  --out "$OUT/addmm.json" 2>&1 | grep -E '^\[|rror'
[ "$SECONDS" -lt "${DEADLINE:-440}" ] && timeout 120 python3 bench/train_step.py --shape 1b --impls peftlab_compiled_addmm \
  --methods lora,vera --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 55 --profile --out "$OUT/addmm_prof.json" \
  2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/addmm.json" > "$OUT/addmm_table.md" 2>&1
chmod 644 "$OUT"/* 2>/dev/null
exit 0
