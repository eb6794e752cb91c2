#!/usr/bin/env bash
# Distributed training on ONE GPU (issue 10): the world-size-1 NCCL tests, then the 1-GPU half of
# bench/distributed.py (1B and 8B Llama shapes; none / DDP / FSDP2 on 1 process; 2 processes are
# recorded as "not run" when only one GPU is visible). Run from the repo root after the lead's set-up
# line; about 3-4 minutes on an H200 (at most 290 s: each part has its own timeout, and the results
# JSON is rewritten after every configuration). Writes 4 files to $OUT.
set -x
OUT=${OUT:-/tmp/dist-out}
mkdir -p "$OUT"
nvidia-smi -L || true

timeout 80 python -m pytest -q -p no:cacheprovider tests/test_distributed_gpu.py > "$OUT/dist_gpu_tests.log" 2>&1
echo "gpu tests exit $?" | tee -a "$OUT/dist_gpu_tests.log"

timeout 190 python bench/distributed.py --shapes 1b,8b --nprocs 1,2 --strategies ddp,fsdp --steps 8 --warmup 2 \
    --timeout 60 --budget 175 --out "$OUT/distributed_1gpu_h200.json" > "$OUT/dist_bench.log" 2>&1
echo "bench exit $?" | tee -a "$OUT/dist_bench.log"

timeout 20 python bench/distributed.py --table "$OUT/distributed_1gpu_h200.json" > "$OUT/dist_table.md" 2>&1
echo "table exit $?"
exit 0
