#!/usr/bin/env bash
# Seventeenth session (2026-12-05): CUDA graphs under checkpointing through the graph-safe lean node (each block call
# begins a graph generation; what the node hands on is cloned out of the graphs' pool; peftlab/train/recompute.py).
# The offloaded 1B step is host-bound (~80 ms of kernels in a 103-121 ms step on the H200; 109 ms on the H100 against
# Unsloth's 133, issue 13's target <= 0.8x): do graphs take the host out of it, at what memory? One call, <= ~9 min,
# carry .unsloth_site.
#   1. the CUDA tests: train() with compile mode "reduce-overhead" under checkpointing on / offload, against eager;
#   2. 1B bf16 LoRA B4 offloaded: compiled default mode, compiled with graphs, Unsloth's offloaded row; then the
#      checkpointing-on row with graphs -> $OUT/{offload_default,offload_graphs,offload_unsloth,on_graphs}.json
#   OUT=... bench/gpu/ckpt_graphs.sh
set -x
OUT=${OUT:-/tmp/ckpt-graphs}
source bench/gpu/unsloth_env.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_packing.py -k "cuda_graphs_under_checkpointing" \
  > "$OUT/tests.txt" 2>&1
tail -5 "$OUT/tests.txt"
row() {  # name setting compile-mode
  PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_COMPILE_MODE=$3 timeout 110 python3 bench/memory.py --steps 10 \
    --warmup 4 --timeout 105 --impls peftlab --settings "$2" --out "$OUT/$1.json" >> "$OUT/log.txt" 2>&1
}
row offload_graphs 1b-lora-ckpt-offload reduce-overhead
row offload_default 1b-lora-ckpt-offload default
timeout 110 python3 bench/memory.py --steps 10 --warmup 1 --timeout 105 --impls unsloth \
  --settings 1b-lora-ckpt-offload --out "$OUT/offload_unsloth.json" >> "$OUT/log.txt" 2>&1
row on_graphs 1b-lora-ckpt-on reduce-overhead
grep -E '^\{' "$OUT/log.txt" | cut -c1-400
grep -c -i "skipping cudagraphs" "$OUT/log.txt"; grep -i -m3 "skipping cudagraphs\|rerecord" "$OUT/log.txt" | cut -c1-300
exit 0
