#!/usr/bin/env bash
# Thirty-second session (2026-12-07), nothing carried, <= ~4 min. Does prompt tuning's peak (5.745 GiB, 1.016x PEFT +
# Liger's 5.654) depend on inductor's first-call autotuning? queue31c's later calls (other loss chunks) peaked 41 MiB
# lower, but they also found the layers' kernels already tuned in the inductor cache. Same call: prompt tuning and the
# frozen base with a cold cache, again with it warm (default chunks), then a warm run with the allocator's trace at
# the peak (bench/peak_where.py).  -> $OUT/cold.json, $OUT/warm.json, $OUT/warm_peak.json
set -x
OUT=${OUT:-/tmp/queue32}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
C=(--shape 1b --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 90 --impls peftlab_compiled)
for RUN in cold warm; do
  timeout 100 python3 bench/train_step.py "${C[@]}" --methods prompt_tuning,frozen_compiled --out "$OUT/$RUN.json" \
    2>&1 | grep -E '^\[|rror|kip'
done
PEFTLAB_BENCH_PEAK_WHERE=1 timeout 80 python3 bench/train_step.py "${C[@]}" --methods prompt_tuning \
  --out "$OUT/warm_peak.json" 2>&1 | grep -E '^\[|rror|kip'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
