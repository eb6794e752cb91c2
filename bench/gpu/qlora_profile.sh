#!/usr/bin/env bash
# Prepared in the ninth session (2026-12-04), not yet run: one H200 call, <= ~8 min, carry .unsloth_site.
# Where does the 8B QLoRA B1 step's time go? It took 358-367 ms eager or compiled (around each compiled call) while B4
# took 514-536 ms: ~300 ms a step do not grow with the batch. Profiles 8b-qlora-b1 eager and compiled
# (torch.profiler, two steps after the timed ones: $OUT/qlora_profile_{eager,compiled}.8b-qlora-b1.txt), then
# Unsloth's row in the same call. Writes $OUT/qlora_{eager,compiled,unsloth}.json and a log.
set -x
OUT=${OUT:-/tmp/qlora-out}
SITE=${UNSLOTH_SITE:-$PWD/.unsloth_site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$SITE:$PWD
PEFTLAB_BENCH_PROFILE=$OUT/qlora_profile_eager timeout 130 python3 bench/memory.py --steps 3 --warmup 1 \
  --timeout 120 --impls peftlab --settings 8b-qlora-b1 --out "$OUT/qlora_eager.json" > "$OUT/qlora.log" 2>&1
PEFTLAB_BENCH_PROFILE=$OUT/qlora_profile_compiled PEFTLAB_BENCH_COMPILE=inductor timeout 150 python3 bench/memory.py \
  --steps 3 --warmup 2 --timeout 140 --impls peftlab --settings 8b-qlora-b1 --out "$OUT/qlora_compiled.json" \
  >> "$OUT/qlora.log" 2>&1
timeout 160 python3 bench/memory.py --steps 3 --warmup 1 --timeout 150 --impls unsloth --settings 8b-qlora-b1 \
  --out "$OUT/qlora_unsloth.json" >> "$OUT/qlora.log" 2>&1
grep -E '^\{' "$OUT/qlora.log" | cut -c1-300
head -30 "$OUT"/qlora_profile_*.txt
exit 0
