#!/usr/bin/env bash
# Run in the seventeenth session (H100, bench/README.md): its pointwise row ran without the flag (the worker lost
# the context manager; fixed since); budget 0.5 0.76x Unsloth's memory. The pointwise rerun: bench/gpu/pointwise.sh.
# Prepared in the tenth session (2026-12-04), run in the thirteenth (2026-12-05: tests 5 passed; LoRA 0.47x PEFT, 0.60x
# Unsloth, budget 0.5 0.499x / 0.64x / 0.76x memory; methods ia3 vera loha lokr; bench/README.md). Next run: the LoRA
# rows again (a second sample of the budget's PEFT ratio) and the methods not yet run with graphs (OFT, AdaLoRA,
# Tied-LoRA) beside the frozen base and IA3. One H200 call, <= ~10 min, carry .unsloth_site.
# Sixteenth session (H100): the LoRA pair ran out of its 100 s after the default row; OFT and Tied-LoRA timed out at
# 45 s (compile + warm-up); AdaLoRA ran (1.03x LoRA). So: no CUDA tests (they passed on 2026-12-05), longer limits,
# AdaLoRA and the default LoRA row left out of the methods invocation (the LoRA pair gives the LoRA row).
# Sixteenth session, later: the LoRA rows first include TrainArgs.recompute_pointwise (peftlab_compiled_pointwise),
# which keeps ~1.5 GiB less at this shape by the CPU count (bench/results/pointwise_cpu_2026-12-05.json): does it meet
# LoRA's memory target (<= 0.9x Unsloth's 6.79 GiB) at the default's time? If so, make it the default. Beside it the
# compiled reference path (peftlab_compiled_ref, PEFTLAB_FAST=0), which keeps as little on the CPU count: is the fused
# node worth its memory under compile? The methods (OFT, Tied-LoRA, IA3) moved to graphs_methods.sh.
# The trainer now runs compiled layers as CUDA graphs by default where they hold (TrainArgs.compile_mode "auto").
#   1. the trainer's graph path on the GPU: the CUDA tests of tests/test_packing.py (train() with compile "auto",
#      gradient accumulation 1 and 2, against eager) and the compiled + checkpointed peak test;
#   2. same-call ratios: our LoRA with graphs (default now), with graphs and activation budget 0.5 (the memory
#      target), PEFT and Unsloth -> $OUT/peers.json, $OUT/lora.json;
#   3. (moved to graphs_methods.sh in the sixteenth session)
#   OUT=... bench/gpu/graphs_next.sh
set -x
OUT=${OUT:-/tmp/graphs-next}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 260 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora \
  --impls peftlab_compiled_pointwise,peftlab_compiled,peftlab_compiled_ref,peftlab_compiled_budget --prime 0 \
  --timeout 65 --out "$OUT/lora.json" 2>&1 | grep -E '^\[|rror'
timeout 170 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 --warmup 3 \
  --repeats 1 --shape 1b --methods lora --impls peft,unsloth --prime 0 --timeout 150 --out "$OUT/peers.json" 2>&1 \
  | grep -E '^\[|rror|kip'
exit 0
