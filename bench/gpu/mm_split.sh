#!/usr/bin/env bash
# Nineteenth session (2026-12-06): the expand product added apart (PEFTLAB_MM_ADD_SPLIT=1, peftlab/ops/mm_add.py)
# against the in-place addmm (which a compiled graph turns into a copy + addmm: "memcpy128", 3.6 ms of the 1B LoRA
# step's device time in this session's profile). 1B LoRA and DoRA, compiled, alternating default / split in four
# processes; then the 1B offloaded row as the trainer now runs it. <= ~5 min, nothing carried.
#   -> $OUT/{inplace,split}_{1,2}.json, $OUT/offload_default.json
set -x
OUT=${OUT:-/tmp/mm_split}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for round in $(seq 1 "${ROUNDS:-2}"); do  # ROUNDS=1 for a call shortened by the device budget
  for form in inplace split; do
    env PEFTLAB_MM_ADD_SPLIT=$([ $form = split ] && echo 1 || echo 0) timeout 100 python3 bench/train_step.py \
      --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora,dora --impls peftlab_compiled --prime 0 \
      --timeout 60 --out "$OUT/${form}_$round.json" 2>&1 | grep -E '^\[|rror'
  done
done
# then, while the call has time, the 1B offloaded row with the joint recompute by default (no PEFTLAB_CKPT_JOINT)
[ "$SECONDS" -lt "${DEADLINE:-200}" ] && env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_OPTIM=paged_adamw_fused \
  timeout 90 python3 bench/memory.py --steps 10 --warmup 4 --timeout 85 --impls peftlab \
  --settings 1b-lora-ckpt-offload --out "$OUT/offload_default.json" 2>&1 | grep -E '^\{' | cut -c1-300
exit 0
