#!/usr/bin/env bash
# Twenty-second session (2026-12-06): --recompute-pointwise beyond LoRA. On 2026-12-06 LoRA ran 58.26 ms / 5.95 GiB
# with it against 56.63 ms / 7.44 GiB without (1.03x the time, 0.80x the memory; Unsloth 6.79 GiB on that host), so
# it would meet issue 14's memory target by default if it holds for the other methods: each here with and without,
# same process order, nothing carried, <= ~9 min.   -> $OUT/pointwise_methods.json
set -x
OUT=${OUT:-/tmp/pointwise-methods}
mkdir -p "$OUT"
# the plain compiled rows without the pointwise recompute (the default for most methods since the twenty-third session)
export PEFTLAB_BENCH_POINTWISE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 560 python3 bench/train_step.py --shape 1b --methods dora,ia3,vera,loha,prompt_tuning,tied_lora \
  --impls peftlab_compiled,peftlab_compiled_pointwise --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 80 \
  --out "$OUT/pointwise_methods.json" 2>&1 | grep -E '^\[|rror|kip'
exit 0
