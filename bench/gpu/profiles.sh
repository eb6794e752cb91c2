#!/usr/bin/env bash
# Eighteenth session (2026-12-06): where the time goes in issue 13's and 14's unmet rows (queue items 1 and 9).
# torch.profiler tables, sorted by device time, of: the 8B QLoRA B4 step (offloaded checkpoints + host embedding
# table, our best-memory row; JOINT=1 profiles the joint recompute instead), the 1B LoRA step and the compiled
# frozen base (B4 x T1024). One call, <= ~8 min, carry .unsloth_site (only for the path; Unsloth is not run here).
#   -> $OUT/b4.json, $OUT/b4_profile.8b-qlora-b4-offload-embed.txt, $OUT/lora.json, $OUT/lora.profile.txt
set -x
OUT=${OUT:-/tmp/profiles}
source bench/gpu/unsloth_env.sh
PEFTLAB_BENCH_PROFILE=$OUT/b4_profile PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_CKPT_JOINT=${JOINT:-0} \
  PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused timeout 200 python3 bench/memory.py --steps 4 \
  --warmup 3 --timeout 195 --impls peftlab --settings 8b-qlora-b4-offload-embed --out "$OUT/b4.json" \
  > "$OUT/log.txt" 2>&1
grep -E '^\{' "$OUT/log.txt" | cut -c1-200
timeout 260 python3 bench/train_step.py --steps 6 --warmup 3 --repeats 1 --shape 1b --methods lora,frozen_compiled \
  --impls peftlab_compiled --prime 0 --timeout 60 --profile --out "$OUT/lora.json" 2>&1 | grep -E '^\[|rror'
head -60 "$OUT"/b4_profile.*.txt
exit 0
