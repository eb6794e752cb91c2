#!/usr/bin/env bash
# Thirty-second session (2026-12-07), nothing carried, <= ~8.5 min (what comes first matters most):
#   1. the serving kernels' CUDA tests after the token-tiled row, route-expand and sub-layer kernels -> $OUT/tests.log
#   2. bench/serve_profile.py (decode step times with CUDA graphs, then kernel tables by name; same script as
#      bench/results/serve/profile_steps_1b_h100_2026-12-07e.log, the per-token kernels) -> $OUT/serve_profile.json
#   3. bench/gpu/queue32.sh: prompt tuning's peak with a cold and a warm inductor cache
set -x
OUT=${OUT:-/tmp/queue34}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=$OUT bash bench/gpu/serve_tests.sh 100  # the same test files and log as the call that ran inline
timeout 210 python3 bench/serve_profile.py --requests 64 --adapters 8 --out "$OUT/serve_profile.json" \
  > "$OUT/serve_profile.log" 2>&1
head -n 14 "$OUT/serve_profile.log"
chmod 644 "$OUT"/* 2>/dev/null
OUT=$OUT bash bench/gpu/queue32.sh
chmod 644 "$OUT"/* 2>/dev/null
exit 0
