#!/usr/bin/env bash
# Twenty-third session (2026-12-06), one call in place of ce_next.sh and pointwise_methods.sh (few machines lent):
# (1) LoRA, prompt tuning, DoRA, IA3 under compiled layers with and without --recompute-pointwise, after the fused
# loss's changes (one chunk of logits alive, no shifted copy, 512-row chunks) and the final norm compiled with the
# layers: does pointwise recompute hold beyond LoRA (1.03x the time, 0.80x the memory on 2026-12-06)? (2) prompt
# tuning with the final norm eager (PEFTLAB_COMPILE_FINAL_NORM=0); (3) prompt tuning's PEFT + Liger row (ours was
# 1.04x its memory). <= ~9.5 min, carry .gpu_liger.   -> $OUT/pointwise.json, $OUT/norm0.json, $OUT/liger_prompt.json
set -x
OUT=${OUT:-/tmp/next23}
mkdir -p "$OUT"
# the plain compiled rows without the pointwise recompute (the default for most methods since the twenty-third session)
export PEFTLAB_BENCH_POINTWISE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
timeout 390 python3 bench/train_step.py --shape 1b --methods lora,prompt_tuning,dora,ia3 \
  --impls peftlab_compiled,peftlab_compiled_pointwise --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 75 \
  --out "$OUT/pointwise.json" 2>&1 | grep -E '^\[|rror|kip'
env PEFTLAB_COMPILE_FINAL_NORM=0 timeout 80 python3 bench/train_step.py --shape 1b --methods prompt_tuning \
  --impls peftlab_compiled --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 70 --out "$OUT/norm0.json" 2>&1 \
  | grep -E '^\[|rror'
timeout 90 python3 bench/train_step.py --shape 1b --methods prompt_tuning --impls peft_liger --steps 10 --warmup 3 \
  --repeats 1 --prime 0 --timeout 80 --out "$OUT/liger_prompt.json" 2>&1 | grep -E '^\[|rror'
exit 0
