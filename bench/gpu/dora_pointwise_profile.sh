#!/usr/bin/env bash
# Twenty-third session (2026-12-06): where DoRA's extra time under the pointwise recompute goes. On the H100 DoRA took
# 66.67 ms with it against 62.50 without (+4.2 ms; LoRA +1.0 ms), 1.17x our LoRA's time (target 1.15x). The
# twenty-fourth session found on the CPU that the recompute rebuilt DoRA's output and its saved copy in backward
# (the graph kept the sum before the rescale, as the policy keeps sums); DoRA's node now keeps that sum z for dm
# and no copy of y. Here, after that change, LoRA and DoRA with and without the recompute in one call (the ratio
# of the targets: DoRA <= 1.15x our LoRA's time, <= 1.2x its memory), then a torch.profiler table of DoRA's default.
# One call, <= ~6 min, nothing carried.   -> $OUT/dora_lora_pw.json, $OUT/dora_profile.json (+ .profile.txt)
# Ran once (twenty-fourth session, H100, at 2c928b7): DoRA 1.163x LoRA's time with the recompute (1.167x before the
# change, another call), but without it DoRA kept 0.22 GiB more (8.09 against 7.87): the change was reverted.
set -x
OUT=${OUT:-/tmp/dora-pointwise-profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
env PEFTLAB_BENCH_POINTWISE=0 timeout 330 python3 bench/train_step.py --shape 1b --methods lora,dora \
  --impls peftlab_compiled,peftlab_compiled_pointwise --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 80 \
  --out "$OUT/dora_lora_pw.json" 2>&1 | grep -E '^\[|rror'
timeout 120 python3 bench/train_step.py --shape 1b --methods dora --impls peftlab_compiled --steps 5 --warmup 3 \
  --repeats 1 --prime 0 --timeout 55 --profile --out "$OUT/dora_profile.json" 2>&1 | grep -E '^\[|rror'
exit 0
