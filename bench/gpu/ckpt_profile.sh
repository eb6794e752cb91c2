#!/usr/bin/env bash
# Prepared in the ninth session (2026-12-04), not yet run: one H200 call, <= ~10 min, carry .unsloth_site.
# Why is the compiled, offloaded 1B LoRA step 129-155 ms when the compiled step without checkpointing is 54-61 ms and
# a recompute adds one forward (~1/3 of the step's GEMMs)? Times the 1B LoRA step compiled with checkpointing off /
# on / offload (around each compiled call), eager offload, and profiles the compiled offload step; then LoRA, DoRA
# and the compiled frozen base in alternating processes (DoRA measured 1.13x and 1.52x our LoRA on two days).
#   OUT=... bench/gpu/ckpt_profile.sh   -> $OUT/ckpt_<mode>.json, $OUT/ckpt_offload_profile.*, $OUT/methods_<r>.json
set -x
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
step() {  # name, impl, extra args...; one 1B LoRA process
  local name=$1 impl=$2; shift 2
  timeout 90 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora --impls "$impl" \
    --prime 0 --timeout 85 --out "$OUT/ckpt_$name.json" "$@" 2>&1 | grep -E '^\[|rror'
}
PYTHONPATH=${UNSLOTH_SITE:-$PWD/.unsloth_site}:$PWD timeout 120 python3 -m pytest -q -x tests/test_memory_cuda.py \
  -k compiled_checkpointed 2>&1 | tail -3  # compiled + checkpointed peak within eager's (bitsandbytes from the site)
step off peftlab_compiled
PEFTLAB_BENCH_CKPT=on step on peftlab_compiled
PEFTLAB_BENCH_CKPT=offload step offload peftlab_compiled
PEFTLAB_BENCH_CKPT=offload step offload_eager peftlab_fce
PEFTLAB_BENCH_CKPT=offload step offload_profile peftlab_compiled --profile
for round in 1 2; do
  timeout 130 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora,dora,frozen_compiled \
    --impls peftlab_compiled --prime 0 --timeout 60 --out "$OUT/methods_$round.json" 2>&1 | grep -E '^\[|rror'
done
exit 0
