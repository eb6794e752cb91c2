#!/usr/bin/env bash
# Issue 14, next measurements (prepared 2026-12-04, not yet run): one H200 call, <= ~9 min, carry .unsloth_site.
#   1. the 1B LoRA step, compiled layers, in alternating processes: default, inductor's CUDA graphs per layer
#      (PEFTLAB_BENCH_COMPILE_MODE=reduce-overhead), combo kernels (PEFTLAB_BENCH_COMBO=1), the mm_add op
#      (PEFTLAB_MM_ADD_OP=1); then PEFT and Unsloth once each -> $OUT/ab_<variant>_<round>.json
#   2. every other method compiled with the cross-entropy row kernel (DoRA, HRA, BOFT, IA3, VeRA) and the compiled
#      frozen base -> $OUT/methods.json (the ratios to our LoRA and to the frozen step changed with the loss kernel)
#   OUT=... bench/gpu/speed_ab.sh
set -x
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
one() {  # name, then env assignments; one peftlab_compiled LoRA process
  local name=$1; shift
  env "$@" timeout 75 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora \
    --impls peftlab_compiled --prime 0 --timeout 70 --out "$OUT/ab_$name.json" 2>&1 | grep -E '^\[|rror'
}
for round in 1 2; do
  one "default_$round" X=1
  one "graphs_$round" PEFTLAB_BENCH_COMPILE_MODE=reduce-overhead
  one "combo_$round" PEFTLAB_BENCH_COMBO=1
  one "mmop_$round" PEFTLAB_MM_ADD_OP=1
done
timeout 150 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 --warmup 3 \
  --repeats 1 --shape 1b --methods lora --impls peft,unsloth --prime 0 --timeout 100 --out "$OUT/peers.json" 2>&1 \
  | grep -E '^\[|rror|kip'
timeout 240 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b \
  --methods lora,dora,hra,boft_f1,ia3,vera,frozen_compiled --impls peftlab_compiled --prime 0 --timeout 60 \
  --out "$OUT/methods.json" 2>&1 | grep -E '^\[|rror'
exit 0
