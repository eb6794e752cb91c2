#!/usr/bin/env bash
# GPU run for issue 8 (peftlab serve), from the repo root on one H200, <= ~7 min in total:
#   1. the serving tests that use CUDA (Triton kernel compiled for real, bf16; engine on cuda fp32 == HF generate)
#   2. bench/serve.py on the 1B Llama shape -> $OUT/serve.json (+ log and markdown table); SERVE_ARGS: more options
#      (e.g. SERVE_ARGS="--static-triton on")
# Each part has its own timeout and the script goes on when one fails; the JSON is written after every scenario.
set -x
OUT=${OUT:-/tmp/serve_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/serve_tests.log" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_math.py tests/test_serve_engine.py tests/test_serve_shared.py \
    >> "$OUT/serve_tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/serve_tests.log"
timeout 280 python3 bench/serve.py --out "$OUT/serve.json" --requests 96 --cuda-graphs ${SERVE_ARGS:-} > "$OUT/serve_bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/serve_bench.log"
timeout 20 python3 bench/serve.py --table "$OUT/serve.json" > "$OUT/serve_table.md" 2>&1
tail -n 30 "$OUT/serve_bench.log"
exit 0
