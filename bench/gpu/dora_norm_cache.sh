#!/usr/bin/env bash
# Twenty-fourth session (2026-12-06): DoRA's ||W0||^2 per row, which compiled layers reduced from every base weight at
# each step (0.47 ms of DoRA's step in that session's profile: the cache was skipped inside graphs), is now read from a
# cache that a model-level pre-hook keeps up to date (methods/dora.py, core/hooks.py). A/B against
# PEFTLAB_DORA_NORM_CACHE=0 (the graph reduces W0 again), alternating, two rounds, LoRA's default beside each (the
# target: DoRA <= 1.15x our LoRA's time; 1.163x before). Nothing carried, <= ~6 min.
#   -> $OUT/dora_cache_<round>.json, $OUT/dora_nocache_<round>.json
set -x
OUT=${OUT:-/tmp/dora-norm-cache}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for round in 1 2; do
  timeout 140 python3 bench/train_step.py --shape 1b --methods dora,lora --impls peftlab_compiled --steps 20 \
    --warmup 3 --repeats 1 --prime 0 --timeout 70 --out "$OUT/dora_cache_$round.json" 2>&1 | grep -E '^\[|rror'
  env PEFTLAB_DORA_NORM_CACHE=0 timeout 80 python3 bench/train_step.py --shape 1b --methods dora \
    --impls peftlab_compiled --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 70 \
    --out "$OUT/dora_nocache_$round.json" 2>&1 | grep -E '^\[|rror'
done
exit 0
