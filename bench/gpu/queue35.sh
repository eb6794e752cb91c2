#!/usr/bin/env bash
# Thirty-second session (2026-12-07), nothing carried, <= ~9.5 min:
#   1. the serving kernels' CUDA tests (the H200 needed more than 100 s: its Triton builds) -> $OUT/tests.log
#   2. bench/serve.py with CUDA graphs (1, 8, 100 adapters, both mixed batches, MoLoRA, bottleneck, LLaMA-Adapter; no
#      PEFT), each graph row of bench/serve.py's flag A/B list again with its flag flipped: among them
#      StepContext.static_row_lanes on (the row shrink and expand by lanes of token tiles, serve/lane_kernels.py, and
#      MoLoRA's route-expand and the bottleneck's expand, serve/lane_expands.py; off by default) for one LoRA, 100
#      adapters, both mixed batches, one MoLoRA and one bottleneck -> $OUT/serve.json (+ log, table)
set -x
OUT=${OUT:-/tmp/queue35}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=$OUT bash bench/gpu/serve_tests.sh 150
timeout 380 python3 bench/serve.py --out "$OUT/serve.json" --requests 96 --adapters 1,8,100 --no-peft --cuda-graphs \
  > "$OUT/serve.log" 2>&1
tail -n 5 "$OUT/serve.log"
timeout 20 python3 bench/serve.py --table "$OUT/serve.json" > "$OUT/serve_table.md" 2>&1
chmod 644 "$OUT"/* 2>/dev/null
exit 0
