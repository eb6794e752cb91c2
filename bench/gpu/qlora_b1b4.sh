#!/usr/bin/env bash
# Sixteenth session (2026-12-05), one H200 call, <= ~9.5 min, carry .unsloth_site: issue 13's 8B QLoRA rows at B1
# and B4 with Unsloth in the same call (the CUDA tests of qlora_next.sh ran in the thirteenth session and are left
# out to make room for B4). Rows in order of importance, each its own process and timeout:
#   B1 with the embedding table offloaded + the fused paged AdamW (both B1 targets in one row?), then B4 with the
#   fused optimizer, B4 with both, Unsloth at B1 and B4, and B4 with bitsandbytes' paged AdamW if time is left.
# -> $OUT/q_<row>.json (at most 7) and $OUT/qlora.log.   OUT=... bench/gpu/qlora_b1b4.sh
set -x
OUT=${OUT:-/tmp/qlora-b1b4}
source bench/gpu/unsloth_env.sh
row() {  # row name, setting, env assignments...
  local name=$1 setting=$2; shift 2
  env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_TORCH_DEQUANT=1 "$@" timeout 120 python3 bench/memory.py --steps 8 \
    --warmup 2 --timeout 115 --impls peftlab --settings "$setting" --out "$OUT/q_$name.json" >> "$OUT/qlora.log" 2>&1
}
row b1_embed_fused 8b-qlora-b1-embed PEFTLAB_BENCH_OPTIM=paged_adamw_fused
row b4_fused 8b-qlora-b4 PEFTLAB_BENCH_OPTIM=paged_adamw_fused
row b4_embed_fused 8b-qlora-b4-offload-embed PEFTLAB_BENCH_OPTIM=paged_adamw_fused
timeout 260 python3 bench/memory.py --steps 8 --warmup 1 --timeout 120 --impls unsloth \
  --settings 8b-qlora-b1,8b-qlora-b4 --out "$OUT/q_unsloth.json" >> "$OUT/qlora.log" 2>&1
row b4_paged 8b-qlora-b4
grep -E '^\{' "$OUT/qlora.log" | cut -c1-300
exit 0
