#!/usr/bin/env bash
# Tenth session (2026-12-04): one H200 call, <= ~7 min. The ninth/tenth-session profiles showed the compiled 1B
# steps of DoRA / HRA / BOFT and the 8B QLoRA B1 step are host-bound (device time per step: LoRA ~50 ms, DoRA ~56,
# HRA ~58, BOFT ~56, frozen ~37; the 8B QLoRA B1 step ~80-110 ms of kernels in a 340-620 ms step). This times every
# method with inductor's CUDA graphs per decoder layer (mode reduce-overhead), the compiled frozen base included (IA3 and VeRA left out for time), and
# then the 8B QLoRA B1 row (checkpointed around each compiled call) with and without CUDA graphs.
#   OUT=... bench/gpu/graphs.sh -> $OUT/graphs_methods.json, $OUT/graphs_qlora_{default,graphs}.json, logs
set -x
OUT=${OUT:-/tmp/graphs-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PEFTLAB_BENCH_COMPILE_MODE=reduce-overhead timeout 230 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 \
  --shape 1b --prime 0 --timeout 60 --methods lora,frozen_compiled,dora,hra,boft_f1 --impls peftlab_compiled \
  --out "$OUT/graphs_methods.json" 2>&1 | grep -E '^\[|rror'
export PYTHONPATH=${UNSLOTH_SITE:-$PWD/.unsloth_site}:$PWD  # bitsandbytes
PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_COMPILE_MODE=reduce-overhead timeout 110 python3 bench/memory.py \
  --steps 5 --warmup 2 --timeout 105 --impls peftlab --settings 8b-qlora-b1 --out "$OUT/graphs_qlora_graphs.json" \
  > "$OUT/graphs_qlora.log" 2>&1
PEFTLAB_BENCH_COMPILE=inductor timeout 90 python3 bench/memory.py --steps 5 --warmup 2 --timeout 85 --impls peftlab \
  --settings 8b-qlora-b1 --out "$OUT/graphs_qlora_default.json" >> "$OUT/graphs_qlora.log" 2>&1
grep -E '^\{|rror' "$OUT/graphs_qlora.log" | cut -c1-400
exit 0
