#!/usr/bin/env bash
# Thirtieth session (2026-12-07): queue rows 7 and 6 of bench/gpu/README.md and the input-side serving rows, one call,
# nothing carried, <= 10 min:
#   7: the served MoLoRA's CUDA cases (tests/test_serve_molora.py -k cuda) -> $OUT/molora_cuda_tests.log
#   6: IA3 beside the frozen base with profiles (the scaled SwiGLU node on, the default) -> $OUT/ia3_prof.json (+ .profile.txt)
#   serving: bench/serve.py on the 1B shape with CUDA graphs, the second mixed batch (LoRA + MoLoRA + bottleneck +
#      LLaMA-Adapter) and each of those methods alone; no PEFT rows, no 1,000-adapter rows (time) -> $OUT/serve.json
set -x
OUT=${OUT:-/tmp/queue30}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/molora_cuda_tests.log" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_molora.py -k cuda >> "$OUT/molora_cuda_tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/molora_cuda_tests.log"
tail -n 3 "$OUT/molora_cuda_tests.log"
timeout 300 python3 bench/serve.py --out "$OUT/serve.json" --requests 96 --adapters 1,8,100 --no-peft --cuda-graphs \
  > "$OUT/serve_bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/serve_bench.log"
timeout 20 python3 bench/serve.py --table "$OUT/serve.json" > "$OUT/serve_table.md" 2>&1
cat "$OUT/serve_table.md"
timeout 150 python3 bench/train_step.py --shape 1b --impls peftlab_compiled --methods ia3,frozen_compiled --steps 20 \
  --warmup 3 --repeats 1 --prime 0 --timeout 90 --profile --out "$OUT/ia3_prof.json" 2>&1 | grep -E '^\[|rror'
chmod 644 "$OUT"/* 2>/dev/null
exit 0
