#!/usr/bin/env bash
# Thirty-third session (2026-12-07), nothing carried, <= ~9 min: the post-grad pass that takes inductor's
# addmm(mm(u, v), x, w) in place (peftlab/ops/mm_add.py addmm_in_place; PEFTLAB_ADDMM_IN_PLACE=0 leaves it out)
# against no pass, 1B LoRA, DoRA, VeRA and the frozen base, compiled, alternating off / on / on / off in four
# processes -> $OUT/{off,on}_{1,2}.json; then, while the call has time, LoRA and VeRA with the pass and profiles
# (the memcpy128 rows should be gone) -> $OUT/on_prof.json (+ .profile.txt)
set -x
OUT=${OUT:-/tmp/queue36}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for run in off_1 on_1 on_2 off_2; do
  env PEFTLAB_ADDMM_IN_PLACE=$([ "${run%_*}" = on ] && echo 1 || echo 0) timeout 130 python3 bench/train_step.py \
    --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora,dora,vera,frozen_compiled --impls peftlab_compiled \
    --prime 0 --timeout 100 --out "$OUT/$run.json" 2>&1 | grep -E '^\[|rror'
done
[ "$SECONDS" -lt "${DEADLINE:-420}" ] && timeout 150 python3 bench/train_step.py --shape 1b --impls peftlab_compiled \
  --methods lora,vera --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 70 --profile --out "$OUT/on_prof.json" \
  2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
