#!/usr/bin/env bash
# Thirty-first session (2026-12-07), nothing carried, <= ~9 min:
#   VeRA beside the frozen base with profiles (1.31x; its GEMM floor ~1.13x) -> $OUT/vera_prof.json (+ .profile.txt)
#   the full serving bench (PEFT rows, 1,000 adapters) on the current code: bench/gpu/serve.sh -> $OUT/serve*.
set -x
OUT=${OUT:-/tmp/queue31b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 bench/train_step.py --shape 1b --impls peftlab_compiled --methods vera,frozen_compiled --steps 20 \
  --warmup 3 --repeats 1 --prime 0 --timeout 90 --profile --out "$OUT/vera_prof.json" 2>&1 | grep -E '^\[|rror'
OUT=$OUT bash bench/gpu/serve.sh
chmod 644 "$OUT"/* 2>/dev/null
exit 0
