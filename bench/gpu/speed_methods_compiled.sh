#!/usr/bin/env bash
# Issue 14: every method with compiled decoder layers (the default on CUDA) on the 1B shape, against our compiled
# LoRA (<= 1.5x for LoHa, LoKr, HRA, OFT, BOFT, AdaLoRA, Tied-LoRA) and the compiled frozen-base step (<= 1.05x for
# IA3, VeRA, prompt tuning), one fresh process per configuration, ~7-8 min on one H200:
#   OUT=... bench/gpu/speed_methods_compiled.sh        (METHODS=..., IMPLS=... override the lists; e.g.
#   METHODS=oft,boft_f1,lora IMPLS=peftlab_compiled,peftlab: compiled and eager side by side)
# Writes $OUT/speed_methods_compiled.json and its log; the JSON is rewritten after every configuration.
set -x
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
METHODS=${METHODS:-lora,frozen_compiled,ia3,vera,prompt_tuning,loha,lokr,hra,oft,boft_f1,adalora,tied_lora}
timeout "${BUDGET:-520}" python3 bench/train_step.py --shape 1b --methods "$METHODS" --impls "${IMPLS:-peftlab_compiled}" \
  --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 90 --out "$OUT/speed_methods_compiled.json" \
  > "$OUT/speed_methods_compiled.log" 2>&1 || echo "stopped early (see speed_methods_compiled.log)"
tail -n 16 "$OUT/speed_methods_compiled.log"
exit 0
