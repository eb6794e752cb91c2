#!/usr/bin/env bash
# Eighteenth session (2026-12-06): the two rows that could each meet a target, in one call, for a session whose
# machine starts kept failing (joint.sh and pointwise.sh need a call each):
#  - issue 13, 8B QLoRA B4: the joint recompute (PEFTLAB_CKPT_JOINT=1) beside Unsloth (time <= Unsloth's?);
#  - issue 14, 1B LoRA: --recompute-pointwise for real beside the default and Unsloth (memory <= 0.9x Unsloth's at the
#    default's time?).
# Nineteenth session: + the 8B B4 row with the last 2 blocks kept out of the checkpointing (--checkpoint-keep 2).
# Then, while the call has time, the plain 8B B4 row (joint vs plain in the same run). <= ~9.8 min, carry .unsloth_site.
#   -> $OUT/tests.txt, $OUT/b4_{joint,keep2,unsloth,plain}.json, $OUT/lora.json, $OUT/peers.json, $OUT/log.txt
set -x
OUT=${OUT:-/tmp/next}
source bench/gpu/unsloth_env.sh
fits() { [ $((SECONDS + $1)) -lt "${DEADLINE:-590}" ]; }  # room for a step of at most $1 seconds before DEADLINE
if [ -z "$SKIP_TESTS" ]; then  # SKIP_TESTS=1 for a call shortened by the device budget
  timeout 60 python3 -m pytest -q -p no:cacheprovider -x tests/test_activations.py -k 'joint or kept or keep' > "$OUT/tests.txt" 2>&1
  tail -2 "$OUT/tests.txt"
fi
b4() {  # name joint [setting suffix]
  env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_CKPT_JOINT=$2 PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused \
    timeout 130 python3 bench/memory.py --steps 8 --warmup 3 --timeout 125 --impls peftlab \
    --settings "8b-qlora-b4-offload-embed$3" --out "$OUT/$1.json" >> "$OUT/log.txt" 2>&1
}
b4 b4_joint 1
b4 b4_keep2 0 -keep2  # nineteenth session: the last 2 blocks not checkpointed (memory to spare: 5.70 of 6.85 GiB)
timeout 190 python3 bench/memory.py --steps 8 --warmup 1 --timeout 185 --impls unsloth --settings 8b-qlora-b4 \
  --out "$OUT/b4_unsloth.json" >> "$OUT/log.txt" 2>&1
grep -E '^\{' "$OUT/log.txt" | cut -c1-200
fits 130 && timeout 130 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora \
  --impls peftlab_compiled_pointwise,peftlab_compiled --prime 0 --timeout 60 --out "$OUT/lora.json" 2>&1 \
  | grep -E '^\[|rror'
fits 150 && timeout 150 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 \
  --warmup 3 --repeats 1 --shape 1b --methods lora --impls unsloth --prime 0 --timeout 140 --out "$OUT/peers.json" \
  2>&1 | grep -E '^\[|rror|kip'
fits 130 && b4 b4_plain 0
grep -E '^\{' "$OUT/log.txt" | cut -c1-200
exit 0
