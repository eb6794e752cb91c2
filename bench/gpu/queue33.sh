#!/usr/bin/env bash
# Thirty-second session (2026-12-07), nothing carried, <= ~9.5 min:
#   1. the serving kernels' CUDA tests after the token-tiled row kernels (a tile of 16 tokens a distinct row at a
#      time: one read of a row's factors for all of its tokens)  -> $OUT/tests.log
#   2. bench/serve.py (1 and 8 adapters, both mixed batches, MoLoRA, bottleneck, LLaMA-Adapter; CUDA graphs; no
#      PEFT) -> $OUT/serve.json (+ log, table)
#   3. bench/gpu/queue32.sh: prompt tuning's peak with a cold and a warm inductor cache -> $OUT/cold.json, warm.json,
#      warm_peak.json
set -x
OUT=${OUT:-/tmp/queue33}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/tests.log" 2>&1
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_serve_kernels.py tests/test_serve_shared.py \
  tests/test_serve_molora.py tests/test_serve_bottleneck.py >> "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
tail -n 3 "$OUT/tests.log"
timeout 220 python3 bench/serve.py --out "$OUT/serve.json" --requests 96 --adapters 1,8 --no-peft --cuda-graphs \
  > "$OUT/serve.log" 2>&1
tail -n 5 "$OUT/serve.log"
timeout 20 python3 bench/serve.py --table "$OUT/serve.json" > "$OUT/serve_table.md" 2>&1
OUT=$OUT bash bench/gpu/queue32.sh
chmod 644 "$OUT"/* 2>/dev/null
exit 0
