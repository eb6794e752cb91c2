#!/usr/bin/env bash
# Thirtieth session (2026-12-07), second call, nothing carried, <= 10 min:
#   tests: the new row-kernel paths of the routed (MoLoRA) and sub-layer (bottleneck) tables, the serving kernels, the
#      scaled SwiGLU kernel's launch choices, on CUDA -> $OUT/tests.log
#   swiglu: bench/swiglu_bwd.py, the node's backward under launch choices beside the frozen base's SwiGLU backward
#      -> $OUT/swiglu_bwd.json; then IA3 with the best choice and with the default, and the frozen base, one call of
#      bench/train_step.py each in order (best, frozen, default) -> $OUT/ia3_{best,default}.json, $OUT/frozen.json
#   serving: bench/serve.py (1 and 8 adapters, mixed batches, CUDA graphs; no PEFT) after the row-kernel paths
#      -> $OUT/serve.json
set -x
OUT=${OUT:-/tmp/queue30b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/tests.log" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_molora.py tests/test_serve_bottleneck.py \
  tests/test_serve_kernels.py tests/test_scaled_swiglu.py -k "row_kernels or launch_choices or row_lowrank or fixed_shape_step_triton" \
  >> "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
tail -n 3 "$OUT/tests.log"
timeout 150 python3 bench/swiglu_bwd.py --budget-s 80 --out "$OUT/swiglu_bwd.json" > "$OUT/swiglu_bwd.log" 2>&1
tail -n 2 "$OUT/swiglu_bwd.log"
BEST=$(python3 -c "import json; b = json.load(open('$OUT/swiglu_bwd.json')).get('best') or {}; \
print(json.dumps({k: b[k] for k in ('BLOCK_T', 'BLOCK_C', 'num_warps', 'programs', 'EACH') if k in b}))")
C=(--shape 1b --impls peftlab_compiled --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 80)
PEFTLAB_SWIGLU_CONFIG="$BEST" timeout 100 python3 bench/train_step.py "${C[@]}" --methods ia3 --out "$OUT/ia3_best.json" \
  2>&1 | grep -E '^\[|rror'
timeout 100 python3 bench/train_step.py "${C[@]}" --methods frozen_compiled --out "$OUT/frozen.json" 2>&1 | grep -E '^\[|rror'
timeout 100 python3 bench/train_step.py "${C[@]}" --methods ia3 --out "$OUT/ia3_default.json" 2>&1 | grep -E '^\[|rror'
timeout 200 python3 bench/serve.py --out "$OUT/serve.json" --requests 96 --adapters 1,8 --no-peft --cuda-graphs \
  > "$OUT/serve_bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/serve_bench.log"
timeout 20 python3 bench/serve.py --table "$OUT/serve.json" > "$OUT/serve_table.md" 2>&1
grep -E "mixed|molora|bottleneck|llama|base model" "$OUT/serve_table.md"
chmod 644 "$OUT"/* 2>/dev/null
exit 0
