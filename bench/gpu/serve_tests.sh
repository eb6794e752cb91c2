#!/usr/bin/env bash
# The serving kernels' CUDA tests (row, routed, sub-layer kernels) -> $OUT/tests.log; $1: seconds (default 150).
OUT=${OUT:-/tmp/serve_tests}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/tests.log" 2>&1
timeout "${1:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_serve_kernels.py tests/test_serve_shared.py \
  tests/test_serve_molora.py tests/test_serve_bottleneck.py >> "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
tail -n 3 "$OUT/tests.log"
