#!/usr/bin/env bash
# Prepared in the eleventh session (2026-12-04), not yet run (no device was lent that session): one H200 call,
# <= ~9 min, carry .unsloth_site. The 8B QLoRA rows compiled (checkpoint around each compiled call), with
# bitsandbytes' dequantization inside the compiled layers (PEFTLAB_TORCH_DEQUANT=0, the rows so far) against
# peftlab's torch form (peftlab/quant/dequant.py: one fused kernel per weight; the default now), then the torch form
# with the fused paged AdamW (PEFTLAB_BENCH_OPTIM=paged_adamw_fused), one process per row, Unsloth's row last.
# Also the checkpoint traced into the compiled graphs with the torch form (PEFTLAB_CKPT_COMPILED=traced): in the
# ninth session traced was fast (8B B1 255 ms = 0.88x Unsloth) but kept every layer's dequantized weights (21.6 GiB),
# bitsandbytes' dequantization being a custom operator the partitioner would not recompute; now it is torch operators.
# Each row has its own timeout, and what is under $OUT comes back if the call runs out: rows in order of importance.
#   1. CUDA tests: the torch form against bitsandbytes' CUDA kernel (prints how many elements differ); the fused
#      paged AdamW's managed moments.
#   2. SETTING (default 8b-qlora-b1; also 8b-qlora-b4) rows, and ${SETTING}-embed with the torch form (for b4:
#      8b-qlora-b4-offload-embed) -> $OUT/qlora_<row>.json (6 files); Unsloth -> $OUT/qlora_unsloth.json; log
#      $OUT/qlora.log (8 files: at most 8 come back from a call). The lean block checkpoint
#      (peftlab/train/recompute.py, PEFTLAB_CKPT_REENTRANT) is on in every row but "before" and "torch_ckpt".
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
# the eleventh session's defaults (torch-form dequantization, lean block checkpoint) against the tenth's
row torch_dequant "$SETTING" PEFTLAB_TORCH_DEQUANT=1
row before "$SETTING" PEFTLAB_TORCH_DEQUANT=0 PEFTLAB_CKPT_REENTRANT=0
row torch_dequant_embed "$embed" PEFTLAB_TORCH_DEQUANT=1
row torch_dequant_fused_optim "$SETTING" PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_BENCH_OPTIM=paged_adamw_fused
timeout 230 python3 bench/memory.py --steps 5 --warmup 1 --timeout 110 --impls unsloth --settings "$SETTING" \
  --out "$OUT/qlora_unsloth.json" >> "$OUT/qlora.log" 2>&1
# if time is left: each change alone
row torch_dequant_traced "$SETTING" PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_CKPT_COMPILED=traced
row torch_dequant_torch_ckpt "$SETTING" PEFTLAB_TORCH_DEQUANT=1 PEFTLAB_CKPT_REENTRANT=0
grep -E '^\{' "$OUT/qlora.log" | cut -c1-300
exit 0
