#!/usr/bin/env bash
# Prepared in the eleventh session (2026-12-04), run for B1 in the thirteenth (2026-12-05), rows updated: one H200 call,
# <= ~9 min, carry .unsloth_site. 8B QLoRA rows, compiled with peftlab's torch-form dequantization (checkpoint around
# each compiled call, the lean block checkpoint), one process per row, Unsloth's row after the main ones; each row has
# its own timeout and what is under $OUT comes back if the call runs out, so rows are in order of importance.
#   1. CUDA tests: the torch form against bitsandbytes' CUDA kernel (prints how many elements differ); the fused
#      paged AdamW's managed moments; LoftQ and trainable tokens on CUDA.
#   2. SETTING (default 8b-qlora-b1; also 8b-qlora-b4) rows, and ${SETTING}-embed (for b4: 8b-qlora-b4-offload-embed)
#      -> $OUT/qlora_<row>.json; Unsloth -> $OUT/qlora_unsloth.json; log $OUT/qlora.log (at most 8 files come back).
#   OUT=... [SETTING=8b-qlora-b4] bench/gpu/qlora_next.sh
set -x
OUT=${OUT:-/tmp/qlora-next}
SETTING=${SETTING:-8b-qlora-b1}
source bench/gpu/unsloth_env.sh
timeout 100 python3 -m pytest -q -s tests/test_quant_bnb.py -k cuda 2>&1 | grep -E "differ|passed|failed|rror" | tail -4
timeout 60 python3 -m pytest -q tests/test_paged_optim.py 2>&1 | tail -1
timeout 60 python3 -m pytest -q tests/test_loftq.py tests/test_trainable_tokens.py 2>&1 | tail -1  # LoftQ's SVDs on CUDA
row() {  # row name, setting, env assignments...
  local name=$1 setting=$2; shift 2
  env PEFTLAB_BENCH_COMPILE=inductor "$@" timeout 110 python3 bench/memory.py --steps 5 --warmup 2 --timeout 105 \
    --impls peftlab --settings "$setting" --out "$OUT/qlora_$name.json" >> "$OUT/qlora.log" 2>&1
}
embed=${SETTING}-embed
[ "$SETTING" = 8b-qlora-b4 ] && embed=8b-qlora-b4-offload-embed
# Thirteenth session (2026-12-05) ran B1: compiled torch form 232 ms / 6.22 GiB, + fused paged AdamW 208 ms, + embed
# offload 265 ms / 5.24 GiB, Unsloth 270 ms / 6.23 GiB (bench/README.md). Next: the embed offload with the fused
# optimizer (both targets with a margin?), and B4 (SETTING=8b-qlora-b4) with the same rows.
row torch_dequant "$SETTING" PEFTLAB_TORCH_DEQUANT=1
row embed_fused_optim "$embed" PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused
row torch_dequant_embed "$embed" PEFTLAB_TORCH_DEQUANT=1
row torch_dequant_fused_optim "$SETTING" PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused
timeout 230 python3 bench/memory.py --steps 5 --warmup 1 --timeout 110 --impls unsloth --settings "$SETTING" \
  --out "$OUT/qlora_unsloth.json" >> "$OUT/qlora.log" 2>&1
# if time is left: the embed offload with the fused optimizer once more (the spread at B1 was 216-288 ms)
row embed_fused_optim_2 "$embed" PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused
grep -E '^\{' "$OUT/qlora.log" | cut -c1-300
exit 0
