#!/usr/bin/env bash
# Twentieth session (2026-12-06): where `--recompute-pointwise`'s extra time goes (issue 14's memory target is met
# only with it: 62.14 ms / 5.94 GiB against the default's 58.12 / 7.44, nineteenth session). torch.profiler tables,
# sorted by device time, of the 1B LoRA step with and without it (B4 x T1024, CUDA graphs); compare the two tables'
# pointwise / reduction kernels (recomputed RMSNorm means, SwiGLU, rotary) to see what the recompute costs and
# whether keeping the reductions (tiny (tokens, 1) results) would buy the time back. One call, <= ~4 min, nothing
# carried.   -> $OUT/pointwise.json, $OUT/pointwise.profile.txt
set -x
OUT=${OUT:-/tmp/pointwise-profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 230 python3 bench/train_step.py --steps 6 --warmup 3 --repeats 1 --shape 1b --methods lora \
  --impls peftlab_compiled,peftlab_compiled_pointwise --prime 0 --timeout 100 --profile \
  --out "$OUT/pointwise.json" 2>&1 | grep -E '^\[|rror'
ls "$OUT"
exit 0
