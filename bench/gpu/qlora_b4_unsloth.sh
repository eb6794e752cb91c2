#!/usr/bin/env bash
# Prepared in the sixteenth session (2026-12-05), not yet run: issue 13's 8B QLoRA B4 with Unsloth in the same call,
# which qlora_b1b4.sh did not reach (its Unsloth B1 row first wrote the 8B random checkpoint and the B4 row ran out of
# time). One H100/H200 call, <= ~9 min, carry .unsloth_site. Unsloth first this time (its own timeout covers writing
# the checkpoint), then our two B4 rows of the sixteenth session again, each its own process.
#   -> $OUT/b4_unsloth.json, $OUT/b4_fused.json, $OUT/b4_embed_fused.json, $OUT/qlora.log
set -x
OUT=${OUT:-/tmp/qlora-b4}
source bench/gpu/unsloth_env.sh
timeout 330 python3 bench/memory.py --steps 8 --warmup 1 --timeout 320 --impls unsloth --settings 8b-qlora-b4 \
  --out "$OUT/b4_unsloth.json" >> "$OUT/qlora.log" 2>&1
for row in "b4_fused 8b-qlora-b4" "b4_embed_fused 8b-qlora-b4-offload-embed"; do
  set -- $row
  env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused timeout 120 \
    python3 bench/memory.py --steps 8 --warmup 2 --timeout 115 --impls peftlab --settings "$2" \
    --out "$OUT/$1.json" >> "$OUT/qlora.log" 2>&1
done
grep -E '^\{' "$OUT/qlora.log" | cut -c1-300
exit 0
