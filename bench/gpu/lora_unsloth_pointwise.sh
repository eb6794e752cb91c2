#!/usr/bin/env bash
# Twenty-third session (2026-12-06): LoRA's memory against Unsloth's in one call, after the fused loss's and the
# final norm's changes: peftlab's compiled layers with and without --recompute-pointwise, then Unsloth (issue 14's
# target: peak <= 0.9x Unsloth's, 6.79 GiB on the twenty-second session's H100; LoRA 7.44 GiB, with pointwise 5.95
# before those changes). Decides whether recompute_pointwise becomes the trainer's default. One call, <= ~6 min,
# carry .unsloth_site.   -> $OUT/lora.json, $OUT/unsloth.json
set -x
OUT=${OUT:-/tmp/lora-unsloth-pointwise}
mkdir -p "$OUT"
# the plain compiled rows without the pointwise recompute (the default for most methods since the twenty-third session)
export PEFTLAB_BENCH_POINTWISE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 170 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora \
  --impls peftlab_compiled,peftlab_compiled_pointwise --prime 0 --timeout 75 --out "$OUT/lora.json" 2>&1 \
  | grep -E '^\[|rror'
timeout 180 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 --warmup 3 \
  --repeats 1 --shape 1b --methods lora --impls unsloth --prime 0 --timeout 160 --out "$OUT/unsloth.json" 2>&1 \
  | grep -E '^\[|rror|kip'
exit 0
