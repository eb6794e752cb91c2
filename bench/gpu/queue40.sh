#!/usr/bin/env bash
# Thirty-fifth session (2026-12-08), carry .gpu_liger, <= ~9.5 min: issue 14's memory rows still open or not
# re-measured side by side. Prefix tuning (its attention on flash since the thirty-fourth session) and prompt tuning,
# ours against PEFT + Liger with the frozen base, one run each -> $OUT/liger_prefix_prompt.json; then (row 11)
# prompt tuning with 128 MiB loss chunks (the run before warms inductor's cache), its peak's owner recorded ->
# $OUT/prompt_chunk128.json
set -x
OUT=${OUT:-/tmp/queue40}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
timeout 330 python3 bench/train_step.py --shape 1b --methods prefix_tuning,prompt_tuning,frozen_compiled \
  --impls peftlab_compiled,peft_liger --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 75 \
  --out "$OUT/liger_prefix_prompt.json" 2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/liger_prefix_prompt.json" > "$OUT/liger_prefix_prompt_table.md" 2>&1
left=$(( ${DEADLINE:-550} - SECONDS ))
[ "$left" -gt 80 ] && PEFTLAB_CE_CHUNK_MIB=128 PEFTLAB_BENCH_PEAK_WHERE=1 timeout "$left" python3 bench/train_step.py \
  --shape 1b --methods prompt_tuning --impls peftlab_compiled --steps 10 --warmup 3 --repeats 1 --prime 0 \
  --timeout 70 --out "$OUT/prompt_chunk128.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
