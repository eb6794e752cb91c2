#!/usr/bin/env bash
# Twenty-third session (2026-12-06): where DoRA's extra time under the pointwise recompute goes. On the H100 DoRA took
# 66.67 ms with it against 62.50 without (+4.2 ms; LoRA +1.0 ms), 1.17x our LoRA's time (target 1.15x). A
# torch.profiler table of each (the default, which recomputes, and PEFTLAB_BENCH_POINTWISE=0), and LoRA's default
# beside; and the default with PEFTLAB_DORA_SHARE_OUTPUT=1 (the output itself saved, not a copy: safe under
# inductor, which writes no gradient into saved tensors). One call, <= ~5 min, nothing carried.
#   -> $OUT/dora_pw.json (+ .profile.txt), $OUT/dora_plain.json, $OUT/dora_pw_share.json (+ ...)
set -x
OUT=${OUT:-/tmp/dora-pointwise-profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 120 python3 bench/train_step.py --shape 1b --methods dora,lora --impls peftlab_compiled --steps 5 --warmup 3 \
  --repeats 1 --prime 0 --timeout 55 --profile --out "$OUT/dora_pw.json" 2>&1 | grep -E '^\[|rror'
env PEFTLAB_BENCH_POINTWISE=0 timeout 120 python3 bench/train_step.py --shape 1b --methods dora --impls peftlab_compiled \
  --steps 5 --warmup 3 --repeats 1 --prime 0 --timeout 55 --profile --out "$OUT/dora_plain.json" 2>&1 | grep -E '^\[|rror'
env PEFTLAB_DORA_SHARE_OUTPUT=1 timeout 120 python3 bench/train_step.py --shape 1b --methods dora --impls peftlab_compiled \
  --steps 5 --warmup 3 --repeats 1 --prime 0 --timeout 55 --profile --out "$OUT/dora_pw_share.json" 2>&1 | grep -E '^\[|rror'
exit 0
