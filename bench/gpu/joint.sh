#!/usr/bin/env bash
# Seventeenth session (2026-12-05), not yet run: the joint recompute (PEFTLAB_CKPT_JOINT=1, peftlab/train/recompute.py
# Joint: each compiled block's recompute and backward as one compiled call, so the compiler drops the block's output
# product, which the backward never reads: down_proj is 27% of an 8B block's forward matmul work, 14% of a 1B
# block's). Issue 13's two unmet time targets are checkpointed steps: 8B QLoRA B4 (1.03x Unsloth's time, target
# <= 1.00x) and the 1B offloaded row (0.86x, target <= 0.8x). Our rows with and without it, Unsloth's beside them.
# 8B B4 first; the 1B rows only if the first part left time. One call, <= ~9.5 min, carry .unsloth_site.   -> $OUT/*.json, $OUT/log.txt
set -x
OUT=${OUT:-/tmp/joint}
source bench/gpu/unsloth_env.sh
timeout 60 python3 -m pytest -q -p no:cacheprovider -x tests/test_activations.py -k joint > "$OUT/tests.txt" 2>&1
tail -2 "$OUT/tests.txt"
ours() {  # name setting joint
  env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_CKPT_JOINT=$3 PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused \
    timeout 130 python3 bench/memory.py --steps 8 --warmup 3 --timeout 125 --impls peftlab --settings "$2" \
    --out "$OUT/$1.json" >> "$OUT/log.txt" 2>&1
}
ours b4_joint 8b-qlora-b4-offload-embed 1
timeout 200 python3 bench/memory.py --steps 8 --warmup 1 --timeout 195 --impls unsloth --settings 8b-qlora-b4 \
  --out "$OUT/b4_unsloth.json" >> "$OUT/log.txt" 2>&1
ours b4_plain 8b-qlora-b4-offload-embed 0
# the 1B offloaded rows only while the call has time left (issue 13's more important miss is B4's 3%)
if [ "$SECONDS" -lt 300 ]; then
  ours offload_joint 1b-lora-ckpt-offload 1
  ours offload_plain 1b-lora-ckpt-offload 0
  timeout 100 python3 bench/memory.py --steps 10 --warmup 1 --timeout 95 --impls unsloth \
    --settings 1b-lora-ckpt-offload --out "$OUT/offload_unsloth.json" >> "$OUT/log.txt" 2>&1
fi
grep -E '^\{' "$OUT/log.txt" | cut -c1-200
exit 0
