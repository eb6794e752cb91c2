#!/usr/bin/env bash
# Prepared in the tenth session (2026-12-04), not yet run: one H200 call each, <= ~8 min, carry .unsloth_site.
# Can CUDA graphs run under checkpointing if each compiled block's output is cloned out of the graphs' pool
# (PEFTLAB_CKPT_CLONE_OUTPUTS=1, peftlab/train/activations.py)? Without it the 8B QLoRA B1 row failed ("accessing
# tensor output of CUDAGraphs that has been overwritten"). The checkpointed steps are host-bound (8B QLoRA B1: ~78 ms
# of kernels in a 338-366 ms step; 1B offloaded: ~80 ms in 103-121 ms), so graphs would be the big lever for issue 13.
# Eleventh session: the fused paged AdamW row moved to bench/gpu/qlora_next.sh (run that first); checkpointing now
# takes the lean block node (peftlab/train/recompute.py) by default, whose recompute runs right before the block's
# backward, and the compiled layers dequantize with torch operators; the CUDA peak test of compiled + checkpointed
# blocks (around and traced) runs first here.
# SETTINGS (default "8b-qlora-b1"; also "8b-qlora-b1-embed", "1b-lora-ckpt-offload"): each compiled with graphs and
# clones, one process each; then the first without clones; then the eager dequantization A/B. The same rows without graphs
# ran on 2026-12-04: QLoRA B1 338-366 ms / 6.49 GiB, 1B offloaded 103-121 ms / 2.98 GiB.
#   OUT=... [SETTINGS=...] bench/gpu/graphs_ckpt.sh -> $OUT/ckpt_graphs_<setting>.json, ckpt_graphs_noclone_*.json,
#   ckpt_eager_dequant_kernel{0,1}.json, ckpt_graphs.log
set -x
OUT=${OUT:-/tmp/graphs-ckpt}
SETTINGS=${SETTINGS:-8b-qlora-b1}
source bench/gpu/unsloth_env.sh
# compiled + checkpointed peak against eager, around and traced, bf16 and 4-bit (eleventh session: traced + the torch
# form of the dequantization)
timeout 200 python3 -m pytest -q tests/test_memory_cuda.py -k keep_no_more 2>&1 | tail -3
for setting in $SETTINGS; do
  PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_COMPILE_MODE=reduce-overhead PEFTLAB_CKPT_CLONE_OUTPUTS=1 \
    timeout 120 python3 bench/memory.py --steps 5 --warmup 2 --timeout 115 --impls peftlab --settings "$setting" \
    --out "$OUT/ckpt_graphs_$setting.json" >> "$OUT/ckpt_graphs.log" 2>&1
done
first=${SETTINGS%% *}
# the lean node recomputes a block right before its backward (the overwritten outputs came from torch's checkpoint
# calling the compiled forward again earlier): the first setting once more without the clones
PEFTLAB_BENCH_COMPILE=inductor PEFTLAB_BENCH_COMPILE_MODE=reduce-overhead PEFTLAB_CKPT_CLONE_OUTPUTS=0 \
  timeout 120 python3 bench/memory.py --steps 5 --warmup 2 --timeout 115 --impls peftlab --settings "$first" \
  --out "$OUT/ckpt_graphs_noclone_$first.json" >> "$OUT/ckpt_graphs.log" 2>&1
# the eager 8B B1 step (the trainer's default for 4-bit bases): bitsandbytes' dequantization against peftlab's Triton
# kernel (peftlab/quant/dequant_triton.py, the default on CUDA since the eleventh session); Unsloth's row is in
# qlora_next.sh
for kernel in 0 1; do
  PEFTLAB_DEQUANT_KERNEL=$kernel timeout 100 python3 bench/memory.py --steps 5 --warmup 1 --timeout 95 --impls peftlab \
    --settings 8b-qlora-b1 --out "$OUT/ckpt_eager_dequant_kernel$kernel.json" >> "$OUT/ckpt_graphs.log" 2>&1
done
grep -E '^\{' "$OUT/ckpt_graphs.log" | cut -c1-420
exit 0
