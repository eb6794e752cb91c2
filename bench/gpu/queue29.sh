#!/usr/bin/env bash
# Twenty-ninth session (2026-12-07): queue rows 0a, 0 and 2 of bench/gpu/README.md in one call. Nothing carried; ~8 min.
#   0a: IA3 with / without the scaled SwiGLU node (PEFTLAB_BENCH_SCALED_SWIGLU) in compile mode `default` (no CUDA
#       graphs), each with a profile -> $OUT/ia3_node_default_{on,off}.json (+ .profile.txt)
#   0:  FRoD beside PEFT after the fold / bf16 fix (82ac56c) -> $OUT/frod.json
#   2:  DoRA and LoRA at the current defaults (rule by result size, rank-r sums) -> $OUT/dora_lora.json
set -x
OUT=${OUT:-/tmp/queue29}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
C=(--shape 1b --impls peftlab_compiled --methods ia3 --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 70)
for node in on:1 off:0; do
  PEFTLAB_BENCH_SCALED_SWIGLU=${node#*:} PEFTLAB_BENCH_COMPILE_MODE=default timeout 150 python3 bench/train_step.py \
    "${C[@]}" --profile --out "$OUT/ia3_node_default_${node%%:*}.json" 2>&1 | grep -E '^\[|rror'
done
timeout 125 python3 bench/train_step.py --shape 1b --methods dora,lora --impls peftlab_compiled --steps 20 --warmup 3 \
  --repeats 1 --prime 0 --timeout 60 --out "$OUT/dora_lora.json" 2>&1 | grep -E '^\[|rror'
timeout 150 python3 bench/train_step.py --shape 1b --methods frod --impls peftlab_compiled,peft --steps 10 --warmup 3 \
  --repeats 1 --prime 0 --timeout 70 --out "$OUT/frod.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
