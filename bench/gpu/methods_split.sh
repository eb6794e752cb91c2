#!/usr/bin/env bash
# Twentieth session (2026-12-06): the methods whose fused nodes add an expand product (LoRA, DoRA, VeRA, Tied-LoRA)
# with the split add, default since this session, beside the compiled frozen base and IA3, all with CUDA graphs. The
# nineteenth session's profile showed VeRA with the same device-to-device copies as LoRA (memcpy128, 3.6 ms a step)
# and 5.2 ms of beta-add GEMMs; its 1.34x of the frozen base had only the in-place form measured. One call, <= ~5 min,
# nothing carried.   -> $OUT/methods_split.json
set -x
OUT=${OUT:-/tmp/methods-split}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 290 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b \
  --methods frozen_compiled,lora,vera,ia3,tied_lora,dora --impls peftlab_compiled --prime 0 --timeout 80 \
  --out "$OUT/methods_split.json" 2>&1 | grep -E '^\[|rror'
exit 0
