#!/usr/bin/env bash
# Issue 14/13: peftlab with compiled decoder layers, alone and with an activation budget (PEFTLAB_BENCH_BUDGET,
# default 0.5), beside Unsloth (1b LoRA, B4 x 1024), then 8b LoRA (B2 x 1024) compiled vs HF PEFT vs Unsloth.
# ~6 min on one H200; bench/gpu/speed_unsloth.sh has the full 1b comparison (compiled layers included).
#   OUT=... bench/gpu/speed_compiled.sh      (carry .unsloth_site; UNSLOTH_SITE overrides the path)
# Writes $OUT/speed_compiled_{1b,1b_budget<B>,8b}.json and their logs (SPEED_BUDGETS: the budgets, default 0.5 0.05;
# SPEED_8B=0 leaves the 8b part out).
set -x
OUT=${OUT:-bench/results/gpu}
SITE=${UNSLOTH_SITE:-$PWD/.unsloth_site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
run() {  # name, timeout, then train_step.py options
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/train_step.py --unsloth-site "$SITE" --steps 10 --warmup 3 --repeats 1 \
    --out "$OUT/speed_compiled_$name.json" "$@" > "$OUT/speed_compiled_$name.log" 2>&1 \
    || echo "$name stopped early (see its log)"
  tail -n 14 "$OUT/speed_compiled_$name.log"
}
# SPEED_COMPILED_1B: the 1b implementations (the lean-in-compiled and DoRA rows were measured on 2026-12-03)
run 1b 200 --shape 1b --methods lora --impls "${SPEED_COMPILED_1B:-peftlab_compiled,unsloth}" --prime 1 --timeout 100
for budget in ${SPEED_BUDGETS:-0.5 0.05}; do  # the compiled layers with an activation budget, one process each
  PEFTLAB_BENCH_BUDGET=$budget run "1b_budget$budget" 70 --shape 1b --methods lora --impls peftlab_compiled_budget \
    --prime 0 --timeout 65
done
[ "${SPEED_8B:-1}" = 1 ] && run 8b 150 --shape 8b --methods lora --impls peftlab_compiled,peft,unsloth --prime 0 --timeout 100
exit 0
