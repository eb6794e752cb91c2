#!/usr/bin/env bash
# Thirty-first session (2026-12-07), nothing carried, <= ~7.5 min. Its tests and serving rows ran in that session
# (bench/README.md); left: where MoLoRA's (0.68x the base) and the bottleneck's (0.86x) decode steps spend their time.
#   bench/serve_profile.py (step times, then kernel tables by name; the tables need more than 150 s)
#      -> $OUT/serve_profile.json (+ log)
#   then the serving tests of the routed, sub-layer and grouped kernels on CUDA -> $OUT/tests.log
set -x
OUT=${OUT:-/tmp/queue31}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 300 python3 bench/serve_profile.py --requests 64 --adapters 8 --out "$OUT/serve_profile.json" \
  > "$OUT/serve_profile.log" 2>&1
tail -n 60 "$OUT/serve_profile.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/tests.log" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_molora.py tests/test_serve_shared.py \
  tests/test_serve_bottleneck.py >> "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
tail -n 3 "$OUT/tests.log"
chmod 644 "$OUT"/* 2>/dev/null
exit 0
