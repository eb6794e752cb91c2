#!/usr/bin/env bash
# Sixteenth session (2026-12-05), not yet run: the methods not yet run with CUDA graphs (OFT and Tied-LoRA timed out
# at 40 s in that session's call, IA3 was not reached), beside the compiled frozen base, plus DoRA with
# recompute_pointwise (that row moved to pointwise.sh in the seventeenth session). Eighteenth session: VeRA added (its
# per-rank vector now goes into the fused node: one rank x tokens x in product fewer per adapted linear in backward).
# One H100/H200 call, <= ~8 min, nothing carried. -> $OUT/methods.json, $OUT/dora.json
set -x
OUT=${OUT:-/tmp/graphs-methods}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 420 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b \
  --methods frozen_compiled,lora,oft,tied_lora,ia3,vera --impls peftlab_compiled --prime 0 --timeout 80 \
  --out "$OUT/methods.json" 2>&1 | grep -E '^\[|rror'
exit 0
