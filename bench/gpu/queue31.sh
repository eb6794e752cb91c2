#!/usr/bin/env bash
# Queued after the thirtieth session (2026-12-07), nothing carried, ~8 min:
#   row 8: VeRA beside the frozen base with profiles (1.31x; its GEMM floor ~1.13x) -> $OUT/vera_prof.json (+ .profile.txt)
#   where MoLoRA's (0.62x the base with graphs) and the bottleneck's (0.68x) decode steps spend their time:
#      bench/serve_profile.py (kernels per fixed-shape step by name) -> $OUT/serve_profile.json
set -x
OUT=${OUT:-/tmp/queue31}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 200 python3 bench/train_step.py --shape 1b --impls peftlab_compiled --methods vera,frozen_compiled --steps 20 \
  --warmup 3 --repeats 1 --prime 0 --timeout 90 --profile --out "$OUT/vera_prof.json" 2>&1 | grep -E '^\[|rror'
timeout 300 python3 bench/serve_profile.py --requests 64 --adapters 1,8,100 --out "$OUT/serve_profile.json" \
  > "$OUT/serve_profile.log" 2>&1
tail -n 60 "$OUT/serve_profile.log"
chmod 644 "$OUT"/* 2>/dev/null
exit 0
