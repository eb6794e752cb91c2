#!/usr/bin/env bash
# Adapter arithmetic on ONE GPU (issue 9): the CUDA tests (inductor hot-swap without recompiles, bf16 merged
# export), then bench/arith.py on a Llama shape with 1B widths and 4 layers (compile, forward, hot-swap latency
# and recompiles, GGUF LoRA export, sharded bf16 merged export reloaded). Run from the repo root after the lead's
# set-up line; about 2 minutes at most on an H200, every part under its own timeout. Writes 4 files to $OUT.
set -x
OUT=${OUT:-/tmp/arith-out}
mkdir -p "$OUT"
nvidia-smi -L || true

timeout 35 python -m pytest -q -p no:cacheprovider tests/test_arith_gpu.py > "$OUT/arith_gpu_tests.log" 2>&1
echo "gpu tests exit $?" | tee -a "$OUT/arith_gpu_tests.log"

timeout 75 python bench/arith.py --shape 1b4 --device cuda --out "$OUT/arith_1b4_h200.json" > "$OUT/arith_bench.log" 2>&1
echo "bench exit $?" | tee -a "$OUT/arith_bench.log"

timeout 10 python bench/arith.py --table "$OUT/arith_1b4_h200.json" > "$OUT/arith_table.md" 2>&1
echo "table exit $?"
exit 0
