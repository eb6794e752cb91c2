#!/usr/bin/env bash
# Seventeenth session (2026-12-05), second machine: (1) the CUDA tests of train() with CUDA graphs, with and without
# checkpointing, several graph runs in one process (the first call failed "Running CUDAGraph after shutdown" on the
# second run; the trainer now drops the compiled code with the trees); (2) issue 13's 8B QLoRA B4 row with the
# embedding table in host memory and offloaded checkpoints, compiled as CUDA graphs (the graph-safe lean node) and in
# the default mode, beside Unsloth's B4 row in the same call (B4 missed Unsloth's time by 3% in the first call).
# <= ~8 min, carry .unsloth_site.
#   -> $OUT/tests.txt, $OUT/b4_embed_graphs.json, $OUT/b4_unsloth.json, $OUT/b4_embed_default.json, $OUT/qlora.log
set -x
OUT=${OUT:-/tmp/qlora-b4-graphs}
source bench/gpu/unsloth_env.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_packing.py -k "cuda" > "$OUT/tests.txt" 2>&1
tail -4 "$OUT/tests.txt"
ours() {  # name compile-mode
  env PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_COMPILE_MODE=$2 PEFTLAB_TORCH_DEQUANT=1 \
    PEFTLAB_BENCH_OPTIM=paged_adamw_fused timeout 130 python3 bench/memory.py --steps 8 --warmup 3 --timeout 125 \
    --impls peftlab --settings 8b-qlora-b4-offload-embed --out "$OUT/$1.json" >> "$OUT/qlora.log" 2>&1
}
ours b4_embed_graphs reduce-overhead
timeout 200 python3 bench/memory.py --steps 8 --warmup 1 --timeout 195 --impls unsloth --settings 8b-qlora-b4 \
  --out "$OUT/b4_unsloth.json" >> "$OUT/qlora.log" 2>&1
ours b4_embed_default default
grep -E '^\{' "$OUT/qlora.log" | cut -c1-200
grep -c -i "skipping cudagraphs" "$OUT/qlora.log"
exit 0
