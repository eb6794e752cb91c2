#!/usr/bin/env bash
# Memory-frugal training on the GPU machine (issue 13): the CUDA tests, then bench/memory.py.
# Run from the repo root after the lead's wheel install + PYTHONPATH export. Total <= ~535 s.
# Writes to $OUT: mem_tests.log, mem_bench.log, memory_core.json, memory_70b.json (also the GaLore curves),
# memory_table.md.
set -x
OUT=${OUT:-/tmp/mem-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# 1) the tests that need CUDA (they skip elsewhere; the CPU tests run in CI) (~40 s)
timeout 70 python3 -m pytest -q -rs -p no:cacheprovider tests/test_memory_cuda.py > "$OUT/mem_tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/mem_tests.log"

# 2) side by side: 8B QLoRA (peftlab / PEFT+bnb / Unsloth if importable), 1B checkpointing and fused CE, GaLore
# (most important first: a timeout keeps what was measured, the JSON is written after every row)
timeout 310 python3 bench/memory.py --steps 3 --warmup 1 --timeout 110 --out "$OUT/memory_core.json" \
  --settings 8b-qlora-b4,8b-qlora-b4-offload,1b-lora-ckpt-offload,8b-qlora-b1,1b-lora-ckpt-on,1b-lora-ckpt-off,1b-lora-offload-nofused,1b-galore-r128 \
  > "$OUT/mem_bench.log" 2>&1
echo "core bench rc=$?" >> "$OUT/mem_bench.log"

# 3) GaLore vs AdamW loss curves on chitchat bytes (~30 s), then 70B QLoRA B1 on one GPU (random weights
#    generated + quantized tensor by tensor) (~70 s)
timeout 150 python3 bench/memory.py --settings galore-curve,70b-qlora-b1 --timeout 110 --out "$OUT/memory_70b.json" \
  >> "$OUT/mem_bench.log" 2>&1
echo "70b bench rc=$?" >> "$OUT/mem_bench.log"

# 4) tables from the JSON (whatever was measured before any timeout)
for f in "$OUT/memory_core.json" "$OUT/memory_70b.json"; do
  [ -f "$f" ] && python3 bench/memory.py --table "$f" >> "$OUT/memory_table.md" 2>> "$OUT/mem_bench.log"
done
true
