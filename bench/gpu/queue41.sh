#!/usr/bin/env bash
# Thirty-fifth session (2026-12-08), written for the next call, nothing carried, <= ~9.5 min: prefix tuning's
# attention as SDPA's is_causal over zero rows before the queries (ops/prefix_attention.py, the default since this
# session, untimed) against the flash kernel's bottom-right form (peftlab_compiled_prefix_fa2, the thirty-fourth
# session's default) and the frozen base, two runs each -> $OUT/prefix_ab.json; first the kernel's CUDA tests
# (both forms, bf16 / fp16, compiled with fullgraph); then, while the call has time, the new form's profile beside
# the frozen base -> $OUT/prefix_prof.json (+ .profile.txt: is its attention on cuDNN's kernels, as the base's)
set -x
OUT=${OUT:-/tmp/queue41}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 100 python3 -m pytest -q tests/test_prefix_attention.py 2>&1 | tail -3
timeout 300 python3 bench/train_step.py --shape 1b --methods prefix_tuning,frozen_compiled \
  --impls peftlab_compiled,peftlab_compiled_prefix_fa2 --steps 10 --warmup 3 --repeats 2 --prime 0 --timeout 60 \
  --out "$OUT/prefix_ab.json" 2>&1 | grep -E '^\[|rror'
timeout 20 python3 bench/train_step.py --table "$OUT/prefix_ab.json" > "$OUT/prefix_ab_table.md" 2>&1
left=$(( ${DEADLINE:-550} - SECONDS ))
[ "$left" -gt 100 ] && timeout "$left" python3 bench/train_step.py --shape 1b --impls peftlab_compiled \
  --methods prefix_tuning,frozen_compiled --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 55 --profile \
  --out "$OUT/prefix_prof.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
