#!/usr/bin/env bash
# Twenty-fifth session (2026-12-06): the pointwise recompute costs DoRA 4.0-5.1 ms a step on the H100 (63.09 / 63.31 ms
# without, 68.23 / 67.28 with) and LoRA 1.2 ms; with LoRA's cost DoRA would meet both its targets with it on
# (bench/README.md, twenty-fifth session). torch.profiler tables of DoRA's step without and with the recompute,
# alternating with LoRA's with it, to find the kernels that take the 4 ms. Twenty-sixth session: then DoRA's rank-r
# norm products as broadcast sums (PEFTLAB_DORA_RANK_GEMM=0, methods/dora.py) against the two tiny fp32 GEMMs per
# module (the default), alternating, LoRA beside. One call, <= ~8 min, nothing carried.
#   -> $OUT/dora_nopw.json, dora_pw.json, lora_pw.json (+ .profile.txt beside each), rank_{gemm,sums}.json
set -x
OUT=${OUT:-/tmp/dora-recompute-profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
prof() {  # prof NAME METHOD [POINTWISE]
  env PEFTLAB_BENCH_POINTWISE="${3:-}" timeout 100 python3 bench/train_step.py --shape 1b --methods "$2" \
    --impls peftlab_compiled --steps 5 --warmup 3 --repeats 1 --prime 0 --timeout 90 --profile \
    --out "$OUT/$1.json" 2>&1 | grep -E '^\[|rror'
}
prof dora_nopw dora 0
prof dora_pw dora
prof lora_pw lora
[ "${PROFILE_ONLY:-0}" = 1 ] && exit 0
timeout 140 python3 bench/train_step.py --shape 1b --methods dora,lora --impls peftlab_compiled --steps 20 \
  --warmup 3 --repeats 1 --prime 0 --timeout 70 --out "$OUT/rank_gemm.json" 2>&1 | grep -E '^\[|rror'
env PEFTLAB_DORA_RANK_GEMM=0 timeout 80 python3 bench/train_step.py --shape 1b --methods dora --impls peftlab_compiled \
  --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 70 --out "$OUT/rank_sums.json" 2>&1 | grep -E '^\[|rror'
exit 0
