#!/usr/bin/env bash
# Thirty-fourth session (2026-12-07), nothing carried, <= ~8 min: prefix tuning's attention on the flash kernel
# (ops/prefix_attention.py, peftlab_sdpa, the default; impl peftlab_compiled) against transformers' sdpa with its
# bottom-right mask (impl peftlab_compiled_sdpa_mask: PEFTLAB_PREFIX_FLASH=0), beside the frozen base in the same
# run, 1B, two runs each -> $OUT/prefix.json; the kernel's CUDA tests first.
set -x
OUT=${OUT:-/tmp/queue37}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 90 python3 -m pytest -q tests/test_prefix_attention.py 2>&1 | tail -3
timeout 400 python3 bench/train_step.py --shape 1b --methods prefix_tuning,frozen_compiled \
  --impls peftlab_compiled,peftlab_compiled_sdpa_mask --steps 10 --warmup 3 --repeats 2 --prime 0 --timeout 70 \
  --out "$OUT/prefix.json" 2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/prefix.json" > "$OUT/prefix_table.md" 2>&1
chmod 644 "$OUT"/* 2>/dev/null
exit 0
