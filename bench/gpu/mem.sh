#!/usr/bin/env bash
# Memory-frugal training on the GPU machine (issue 13): the CUDA tests, then bench/memory.py side by side with
# Unsloth. Carry Unsloth's site folder (/work/shared/anchors/unsloth_site.sh .unsloth_site: it holds bitsandbytes
# too) and run from the repo root. Total <= ~540 s; each JSON is rewritten after every row, so a timeout keeps
# what was measured. Writes to $OUT: mem_tests.log, mem_bench.log, memory_a.json, memory_b.json, memory_table.md.
# Wheels the image lacks (galore-torch for the GaLore rows: `pip download --no-deps galore-torch -d .whl`) travel in
# .whl (carry it too) and are installed under /tmp/site. MEM_A / MEM_B replace the two setting lists (2026-12-03:
# MEM_A=8b-qlora-b1,8b-qlora-b4 MEM_B=1b-lora-ckpt-offload,1b-galore-r128 took 501 s, GaLore's AdamW row cut off;
# next: MEM_A=8b-qlora-b4-offload-embed,8b-qlora-b1 MEM_B=1b-galore-r128, so its AdamW row gets the time).
set -x
OUT=${OUT:-/tmp/mem-out}
SITE=${UNSLOTH_SITE:-$PWD/.unsloth_site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$SITE:$PWD
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/mem_bench.log" 2>&1

# 1) the tests that need CUDA (they skip elsewhere; the CPU tests run in CI) (~40 s)
timeout 80 python3 -m pytest -q -rs -p no:cacheprovider tests/test_memory_cuda.py > "$OUT/mem_tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/mem_tests.log"

# 2) the 8B QLoRA B4 bar (peftlab with and without the offloaded embedding table, Unsloth) and 1B offloaded
#    checkpointing, side by side with Unsloth; PEFT + bitsandbytes was measured in the previous run (1,191 ms /
#    17.5 GiB) and is left out for time
timeout 300 python3 bench/memory.py --steps 3 --warmup 1 --timeout 100 --out "$OUT/memory_a.json" \
  --impls peftlab,unsloth \
  --settings "${MEM_A:-8b-qlora-b4-offload-embed,8b-qlora-b4,8b-qlora-b4-embed,1b-lora-ckpt-offload}" >> "$OUT/mem_bench.log" 2>&1
echo "part a rc=$?" >> "$OUT/mem_bench.log"

# 3) the rest of the list: 8B B1, checkpointing off / on, GaLore's step
timeout 170 python3 bench/memory.py --steps 3 --warmup 1 --timeout 80 --out "$OUT/memory_b.json" \
  --impls peftlab,unsloth,adamw \
  --settings "${MEM_B:-8b-qlora-b1,1b-lora-ckpt-on,1b-lora-ckpt-off,1b-galore-r128}" >> "$OUT/mem_bench.log" 2>&1
echo "part b rc=$?" >> "$OUT/mem_bench.log"

for f in "$OUT/memory_a.json" "$OUT/memory_b.json"; do
  [ -f "$f" ] && python3 bench/memory.py --table "$f" >> "$OUT/memory_table.md" 2>> "$OUT/mem_bench.log"
done
tail -n 25 "$OUT/mem_bench.log"
true
