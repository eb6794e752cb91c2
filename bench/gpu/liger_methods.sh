#!/usr/bin/env bash
# Prepared in the eleventh session (2026-12-04), not yet run: issue 14's "every method: peak memory <= PEFT + Liger's
# for the same method", which has only been measured for LoRA and DoRA. Two H200 calls of <= ~9.5 min; carry
# .gpu_liger (liger-kernel 0.8.5, built by: pip install --no-deps --target .gpu_liger liger_kernel-0.8.5-*.whl).
#   OUT=... bench/gpu/liger_methods.sh a   # loha lokr hra oft boft adalora tied_lora
#   OUT=... bench/gpu/liger_methods.sh b   # ia3 vera prompt_tuning prefix_tuning p_tuning adaption_prompt (MoLoRA,
#   bottleneck: PEFT has neither)
# peftlab as the trainer runs it on CUDA (compiled layers, CUDA graphs where they hold) against PEFT + Liger, one
# process per row; methods PEFT lacks are skipped by train_step.py with the reason -> $OUT/liger_<part>.json, .log
set -x
PART=${1:?usage: bench/gpu/liger_methods.sh a|b}
OUT=${OUT:-/tmp/liger-methods}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
case "$PART" in
  a) METHODS=loha,lokr,hra,oft,boft,adalora,tied_lora ;;
  b) METHODS=ia3,vera,prompt_tuning,prefix_tuning,p_tuning,adaption_prompt ;;
  *) echo "unknown part $PART (a or b)"; exit 2 ;;
esac
timeout 560 python3 bench/train_step.py --shape 1b --methods "$METHODS" --impls peftlab_compiled,peft_liger \
  --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 75 --out "$OUT/liger_$PART.json" > "$OUT/liger_$PART.log" 2>&1
grep -E '^\[|rror|kip' "$OUT/liger_$PART.log" | tail -40
exit 0
