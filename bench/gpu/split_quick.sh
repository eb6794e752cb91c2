#!/usr/bin/env bash
# Nineteenth session (2026-12-06), the last ~70 s of device time: the 1B LoRA step with the expand product added
# apart (PEFTLAB_MM_ADD_SPLIT=1) and the default, one process each.   -> $OUT/split.json, $OUT/inplace.json
OUT=${OUT:-/tmp/split_quick}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for form in split inplace; do
  env PEFTLAB_MM_ADD_SPLIT=$([ $form = split ] && echo 1 || echo 0) timeout 40 python3 bench/train_step.py --steps 8 \
    --warmup 3 --repeats 1 --shape 1b --methods lora --impls peftlab_compiled --prime 0 --timeout 38 \
    --out "$OUT/$form.json" 2>&1 | grep -E '^\[|rror'
done
exit 0
