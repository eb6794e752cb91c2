#!/usr/bin/env bash
# Issue 14: peftlab (alone, with its fused cross-entropy, on a Liger-patched model) vs HF PEFT vs PEFT + Liger vs Unsloth, LoRA and DoRA
# (Unsloth runs nothing else).
#   bench/gpu/speed_unsloth.sh [1b|8b]     (1b: ~400-570 s; 8b: ~450-520 s, B2 x 1024)
# Needs Unsloth's site folder carried in the repo root as .unsloth_site (built here with
# /work/shared/anchors/unsloth_site.sh .unsloth_site; ~55 MiB); UNSLOTH_SITE overrides the path.
# The 1b call also writes a torch.profiler table of peftlab's fused LoRA and DoRA steps (SPEED_PROFILE=0: not).
# Writes under $OUT: speed_unsloth_<shape>.json, speed_unsloth_<shape>.log (+ 1b: speed_profile_1b.json
# and speed_profile_1b.profile.txt).
# CPU dry run of this script: SPEED_EXTRA="--device cpu --steps 1 --warmup 0" bench/gpu/speed_unsloth.sh tiny
set -x
SHAPE=${1:-1b}
OUT=${OUT:-bench/results/gpu}
SITE=${UNSLOTH_SITE:-$PWD/.unsloth_site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
ls "$SITE" > /dev/null || echo "no Unsloth site folder at $SITE: the unsloth rows will be skipped"
# 8b: fewer implementations (each 8B configuration builds its model afresh: ~30-60 s of the budget)
if [ "$SHAPE" = 1b ]; then BUDGET=440; PRIME=1; PER=120; IMPLS=peftlab,peftlab_fce,peftlab_lean,peftlab_compiled,peftlab_liger,peft,peft_liger,unsloth
else BUDGET=500; PRIME=0; PER=200; IMPLS=peftlab,peftlab_fce,peftlab_lean,peftlab_compiled,peft,unsloth; fi
# shellcheck disable=SC2086  # SPEED_EXTRA is a list of options
timeout "$BUDGET" python3 bench/train_step.py --shape "$SHAPE" --methods lora,dora \
  --impls "$IMPLS" --unsloth-site "$SITE" --steps 10 --warmup 3 --repeats 1 \
  --prime "$PRIME" --timeout "$PER" $SPEED_EXTRA --out "$OUT/speed_unsloth_$SHAPE.json" > "$OUT/speed_unsloth_$SHAPE.log" 2>&1 \
  || echo "comparison stopped early (see the log)"
if [ "$SHAPE" = 1b ] && [ "${SPEED_PROFILE:-1}" = 1 ]; then
  timeout 130 python3 bench/train_step.py --shape 1b --methods lora,dora --impls peftlab --steps 5 --warmup 2 \
    --repeats 1 --prime 0 --timeout 60 --profile --out "$OUT/speed_profile_1b.json" >> "$OUT/speed_unsloth_$SHAPE.log" 2>&1 \
    || echo "profile run stopped early"
fi
tail -n 30 "$OUT/speed_unsloth_$SHAPE.log"
exit 0
