#!/usr/bin/env bash
# Twenty-sixth session (2026-12-06): the pointwise recompute costs DoRA 4.0-5.1 ms a step on the H100 and LoRA 1.2 ms
# (twenty-fifth session). On the CPU, DoRA's recomputed backward graph holds 21 more per-module ops than without the
# recompute (its norm chain: sqrt, clamp, div per module, each a tiny launch); keeping ops on per-module tensors
# (train/pointwise.py; the default since 13ce7cc, PEFTLAB_POINTWISE_SAVE_SMALL=0 the old rule) brings that back to the
# no-recompute count. Also DoRA's rank-r norm products as broadcast sums (PEFTLAB_DORA_RANK_GEMM=0). A/B timed in one
# call, LoRA beside each, then profiles of DoRA's step with the old and the new rule. Nothing carried, <= ~9 min.
# (The twenty-sixth session's H200 call ran this before the default changed, with =1 on the "small" rows.)
#   -> $OUT/{old,small,small_sums}.json, $OUT/prof_{old,small}.json (+ .profile.txt)
set -x
OUT=${OUT:-/tmp/dora-save-small}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ts() {  # ts NAME METHODS TIMEOUT [ENV...]
  local name=$1 methods=$2 limit=$3; shift 3
  env "$@" timeout "$limit" python3 bench/train_step.py --shape 1b --methods "$methods" --impls peftlab_compiled \
    --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 70 --out "$OUT/$name.json" 2>&1 | grep -E '^\[|rror'
}
ts old dora,lora 150 PEFTLAB_POINTWISE_SAVE_SMALL=0 PEFTLAB_DORA_RANK_GEMM=1
ts small dora,lora 150 PEFTLAB_POINTWISE_SAVE_SMALL=1 PEFTLAB_DORA_RANK_GEMM=1
ts small_sums dora 80 PEFTLAB_POINTWISE_SAVE_SMALL=1 PEFTLAB_DORA_RANK_GEMM=0
for pair in "prof_old PEFTLAB_POINTWISE_SAVE_SMALL=0" "prof_small PEFTLAB_POINTWISE_SAVE_SMALL=1"; do
  set -- $pair
  env "${@:2}" timeout 100 python3 bench/train_step.py --shape 1b --methods dora --impls peftlab_compiled --steps 5 \
    --warmup 3 --repeats 1 --prime 0 --timeout 90 --profile --out "$OUT/$1.json" 2>&1 | grep -E '^\[|rror'
done
exit 0
