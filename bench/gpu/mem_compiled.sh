#!/usr/bin/env bash
# Issue 13, next measurement (prepared 2026-12-04, not yet run): the QLoRA and offloaded-checkpointing settings with
# the decoder layers compiled (PEFTLAB_BENCH_COMPILE=inductor; over 4-bit linears and under checkpointing, which
# tests/test_quant_bnb.py checks against eager on CPU) beside the eager ones and Unsloth, in one H200 call
# (<= ~9 min). Carry .unsloth_site (it holds bitsandbytes too). Writes $OUT/mem_{eager,compiled}.json and a log.
set -x
OUT=${OUT:-/tmp/mem-out}
SITE=${UNSLOTH_SITE:-$PWD/.unsloth_site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$SITE:$PWD
SETTINGS=${MEM_SETTINGS:-8b-qlora-b1,8b-qlora-b4,1b-lora-ckpt-offload}
PEFTLAB_BENCH_COMPILE=inductor timeout 250 python3 bench/memory.py --steps 3 --warmup 2 --timeout 110 \
  --impls peftlab --settings "$SETTINGS" --out "$OUT/mem_compiled.json" > "$OUT/mem_compiled.log" 2>&1
timeout 300 python3 bench/memory.py --steps 3 --warmup 1 --timeout 100 --impls peftlab,unsloth \
  --settings "$SETTINGS" --out "$OUT/mem_eager.json" >> "$OUT/mem_compiled.log" 2>&1
grep -E '^\{' "$OUT/mem_compiled.log" | cut -c1-300
exit 0
