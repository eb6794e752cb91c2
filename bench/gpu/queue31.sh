#!/usr/bin/env bash
# Thirty-first session (2026-12-07), nothing carried, <= ~10 min: MoLoRA's grouped routed launches (a shrink and a
# route-expand per group of linears that read one input, B read for the chosen experts only) and the bottleneck
# table's one-launch expand on CUDA:
#   tests: tests/test_serve_{molora,shared,bottleneck}.py on CUDA -> $OUT/tests.log
#   serving: bench/serve.py (1 adapter of each method, both mixed batches, CUDA graphs; the MoLoRA row beside its
#      gates in torch and beside its tables a layer at a time, the bottleneck row beside
#      its torch form, FLAG_AB) -> $OUT/serve.json
#   where MoLoRA's and the bottleneck's decode steps spend their time: bench/serve_profile.py -> $OUT/serve_profile.json
set -x
OUT=${OUT:-/tmp/queue31}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/tests.log" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_molora.py tests/test_serve_shared.py tests/test_serve_bottleneck.py \
  >> "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
tail -n 3 "$OUT/tests.log"
timeout 210 python3 bench/serve.py --out "$OUT/serve.json" --requests 96 --adapters 1,8 --no-peft --cuda-graphs \
  > "$OUT/serve_bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/serve_bench.log"
grep -iE "molora|mixed methods II|base model|rror" "$OUT/serve_bench.log" | tail -n 12
timeout 300 python3 bench/serve_profile.py --requests 64 --adapters 8 --out "$OUT/serve_profile.json" \
  > "$OUT/serve_profile.log" 2>&1
tail -n 40 "$OUT/serve_profile.log"
chmod 644 "$OUT"/* 2>/dev/null
exit 0
