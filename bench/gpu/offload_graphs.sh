#!/usr/bin/env bash
# Sixteenth session (2026-12-05), one H200 call, <= ~9.8 min, carry .unsloth_site. Rows in order of importance:
#   1. issue 13's 1B offloaded-checkpointing row, compiled peftlab (lean block checkpoint, never run on a GPU before)
#      beside Unsloth's offloaded checkpointing -> $OUT/offload.json (mem_compiled.sh's pair, its eager row left out);
#   2. graphs_next.sh without its CUDA tests (they passed in the thirteenth session): PEFT and Unsloth LoRA
#      -> $OUT/peers.json; our LoRA with graphs, and with activation budget 0.5 -> $OUT/lora.json; OFT, AdaLoRA,
#      Tied-LoRA, IA3 beside the compiled frozen base -> $OUT/methods.json.   OUT=... bench/gpu/offload_graphs.sh
set -x
OUT=${OUT:-/tmp/offload-graphs}
source bench/gpu/unsloth_env.sh
PEFTLAB_BENCH_COMPILE=inductor timeout 100 python3 bench/memory.py --steps 8 --warmup 2 --timeout 95 \
  --impls peftlab --settings 1b-lora-ckpt-offload --out "$OUT/offload.json" > "$OUT/log.txt" 2>&1
timeout 110 python3 bench/memory.py --steps 8 --warmup 1 --timeout 105 --impls unsloth \
  --settings 1b-lora-ckpt-offload --out "$OUT/offload_unsloth.json" >> "$OUT/log.txt" 2>&1
grep -E '^\{' "$OUT/log.txt" | cut -c1-300
timeout 150 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 --warmup 3 \
  --repeats 1 --shape 1b --methods lora --impls peft,unsloth --prime 0 --timeout 130 --out "$OUT/peers.json" 2>&1 \
  | grep -E '^\[|rror|kip'
timeout 90 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora \
  --impls peftlab_compiled,peftlab_compiled_budget --prime 0 --timeout 60 --out "$OUT/lora.json" 2>&1 | grep -E '^\[|rror'
timeout 180 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b \
  --methods frozen_compiled,oft,adalora,tied_lora,ia3 --impls peftlab_compiled --prime 0 --timeout 40 \
  --out "$OUT/methods.json" 2>&1 | grep -E '^\[|rror'
exit 0
