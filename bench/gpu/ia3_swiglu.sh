#!/usr/bin/env bash
# Twenty-eighth session (2026-12-07): IA3's feedforward vector folded into the gated MLP's product
# (peftlab/ops/scaled_swiglu.py, on by default in the trainer's steps and the bench worker) against the plain MLP
# (PEFTLAB_BENCH_SCALED_SWIGLU=0), beside the compiled frozen base, in one call; first the CUDA cases of its tests
# (and of the served bottleneck and LLaMA-Adapter adapters, with CUDA graphs: tests/test_serve_{bottleneck,adaption_prompt}.py).
# Nothing carried; ~5 min (1B rows compile ~30-50 s each).
#   -> $OUT/swiglu_tests.log, $OUT/ia3_swiglu_{new,old}.json
set -x
OUT=${OUT:-/tmp/ia3-swiglu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider -p no:logging tests/test_scaled_swiglu.py \
  tests/test_serve_bottleneck.py tests/test_serve_adaption_prompt.py -k "cuda or scaled" > "$OUT/swiglu_tests.log" 2>&1
tail -n 3 "$OUT/swiglu_tests.log"
COMMON=(--shape 1b --impls peftlab_compiled --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 100)
timeout 200 python3 bench/train_step.py "${COMMON[@]}" --methods ia3,frozen_compiled --out "$OUT/ia3_swiglu_new.json" \
  2>&1 | grep -E '^\[|rror'
PEFTLAB_BENCH_SCALED_SWIGLU=0 timeout 110 python3 bench/train_step.py "${COMMON[@]}" --methods ia3 \
  --out "$OUT/ia3_swiglu_old.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
