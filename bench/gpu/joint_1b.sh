#!/usr/bin/env bash
# Nineteenth session (2026-12-06), after next.sh gave the joint recompute's 8B B4 row 0.94x Unsloth's time: the 1B
# offloaded rows with and without it beside Unsloth's (issue 13: <= 0.8x), then the 8B B4 row with the joint recompute
# and the last 2 blocks kept out of the checkpointing. <= ~6 min, carry .unsloth_site.   -> $OUT/*.json, $OUT/log.txt
set -x
OUT=${OUT:-/tmp/joint_1b}
source bench/gpu/unsloth_env.sh
ours() {  # name setting joint
  env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_CKPT_JOINT=$3 PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused \
    timeout 130 python3 bench/memory.py --steps 10 --warmup 4 --timeout 125 --impls peftlab --settings "$2" \
    --out "$OUT/$1.json" >> "$OUT/log.txt" 2>&1
}
ours offload_joint 1b-lora-ckpt-offload 1
ours offload_plain 1b-lora-ckpt-offload 0
timeout 100 python3 bench/memory.py --steps 10 --warmup 1 --timeout 95 --impls unsloth \
  --settings 1b-lora-ckpt-offload --out "$OUT/offload_unsloth.json" >> "$OUT/log.txt" 2>&1
ours b4_joint_keep2 8b-qlora-b4-offload-embed-keep2 1
grep -E '^\{' "$OUT/log.txt" | cut -c1-200
exit 0
