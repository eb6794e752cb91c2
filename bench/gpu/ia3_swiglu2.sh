#!/usr/bin/env bash
# Twenty-ninth session (2026-12-07): the scaled SwiGLU node's second form (the gate / up output scales folded in too,
# 991ff75) against the plain MLP, beside the compiled frozen base, in the trainer's default mode (CUDA graphs); first
# the node's CUDA tests. Nothing carried; ~5 min.   -> $OUT/swiglu2_tests.log, $OUT/ia3_swiglu2_{on,off}.json
set -x
OUT=${OUT:-/tmp/ia3-swiglu2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 90 python3 -m pytest -q -rs -p no:cacheprovider -p no:logging tests/test_scaled_swiglu.py -k "cuda" \
  > "$OUT/swiglu2_tests.log" 2>&1
tail -n 3 "$OUT/swiglu2_tests.log"
COMMON=(--shape 1b --impls peftlab_compiled --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 60)
PEFTLAB_BENCH_SCALED_SWIGLU=1 timeout 140 python3 bench/train_step.py "${COMMON[@]}" --methods ia3,frozen_compiled \
  --out "$OUT/ia3_swiglu2_on.json" 2>&1 | grep -E '^\[|rror'
PEFTLAB_BENCH_SCALED_SWIGLU=0 timeout 75 python3 bench/train_step.py "${COMMON[@]}" --methods ia3 \
  --out "$OUT/ia3_swiglu2_off.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
