#!/usr/bin/env bash
# Twenty-fifth session (2026-12-06): DoRA's magnitude gradient of gate/up is a column sum over tokens that inductor
# puts in its own kernel beside the SwiGLU backward (the H100 profile: triton_red_fused_mul_silu_backward_sum, 69 us a
# layer, ~1.0 ms a step: it reads the SwiGLU's inputs and gradient again); that is about what DoRA's 1.15x target
# lacks. Inductor keeps a pointwise node out of a reduction kernel when the two need different tilings
# (triton.tiling_prevents_reduction_fusion); A/B with it off, and with 2-D tiling preferred, DoRA and IA3 (the same
# reduction-beside-pointwise pattern, 1.08x the frozen base) with LoRA and the frozen base beside, one round. Then
# DoRA and LoRA without the pointwise recompute (the twenty-fourth session: 63.99 / 55.80 ms = 1.147x in that mode,
# before the norm cache). Nothing carried, <= ~6 min.
#   -> $OUT/fusion_default.json (frozen base included), fusion_a.json, fusion_b.json, fusion_nopw.json
set -x
OUT=${OUT:-/tmp/dora-fusion}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
run() {  # run NAME METHODS IMPLS [INDUCTOR SETTINGS]
  env PEFTLAB_BENCH_INDUCTOR="$4" timeout 200 python3 bench/train_step.py --shape 1b --methods "$2" --impls "$3" \
    --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 70 --out "$OUT/$1.json" 2>&1 | grep -E '^\[|rror'
}
run fusion_default dora,lora,ia3,frozen_compiled peftlab_compiled
run fusion_a dora,ia3 peftlab_compiled triton.tiling_prevents_reduction_fusion=0
run fusion_b dora peftlab_compiled triton.tiling_prevents_reduction_fusion=0,triton.prefer_nd_tiling=1,triton.tile_reductions=1
PEFTLAB_BENCH_POINTWISE=0 run fusion_nopw dora,lora peftlab_compiled
exit 0
