#!/usr/bin/env bash
# Seventeenth session (2026-12-05), second machine: the CUDA tests of train() with CUDA graphs (with and without
# checkpointing, several runs in one process: the first call failed "Running CUDAGraph after shutdown" on the
# second run, fixed by dropping the compiled code with the trees), then graphs_methods.sh's method rows (OFT,
# Tied-LoRA, IA3 beside the compiled frozen base and LoRA). <= ~8 min, nothing carried.
set -x
OUT=${OUT:-/tmp/ckpt-graphs-tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_packing.py -k "cuda" > "$OUT/tests.txt" 2>&1
tail -4 "$OUT/tests.txt"
timeout 320 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b \
  --methods frozen_compiled,lora,ia3,oft,tied_lora --impls peftlab_compiled --prime 0 --timeout 80 \
  --out "$OUT/methods.json" 2>&1 | grep -E '^\[|rror'
exit 0
