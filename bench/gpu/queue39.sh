#!/usr/bin/env bash
# Thirty-fifth session (2026-12-08), nothing carried, <= ~9.5 min: row 13's remainder. The in-place addmm pass
# (default since the thirty-fourth session) against the compiled layers without it for HRA, AdaLoRA and Tied-LoRA
# (PEFTLAB_ADDMM_IN_PLACE=0 makes peftlab_compiled the "off" side; peftlab_compiled_addmm forces it on), two runs
# each -> $OUT/addmm_methods.json; then, while the call has time, profiles of prefix tuning beside the frozen base
# (the default: flash's bottom-right attention) -> $OUT/prefix_prof.json (+ .profile.txt), then LoRA and DoRA with
# the pass -> $OUT/addmm_prof.json (+ .profile.txt: are the memcpy128 rows gone)
set -x
OUT=${OUT:-/tmp/queue39}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PEFTLAB_ADDMM_IN_PLACE=0 timeout 300 python3 bench/train_step.py --shape 1b --methods hra,adalora,tied_lora \
  --impls peftlab_compiled,peftlab_compiled_addmm --steps 10 --warmup 3 --repeats 2 --prime 0 --timeout 60 \
  --out "$OUT/addmm_methods.json" 2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/addmm_methods.json" > "$OUT/addmm_methods_table.md" 2>&1
left=$(( ${DEADLINE:-550} - SECONDS ))
[ "$left" -gt 100 ] && timeout "$left" python3 bench/train_step.py --shape 1b --impls peftlab_compiled \
  --methods prefix_tuning,frozen_compiled --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 55 --profile \
  --out "$OUT/prefix_prof.json" 2>&1 | grep -E '^\[|rror'
left=$(( ${DEADLINE:-550} - SECONDS ))
[ "$left" -gt 100 ] && timeout "$left" python3 bench/train_step.py --shape 1b --impls peftlab_compiled \
  --methods lora,dora --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 55 --profile \
  --out "$OUT/addmm_prof.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
