#!/usr/bin/env bash
# What the sixth session changed without a GPU to measure it, in one call (~8 min on one H200):
#   1. bench/gpu/serve.sh: the serving tests on CUDA and bench/serve.py; its mixed-method graph row now also runs with
#      VeRA's first product apart from the base GEMM (static_vera_in_base off) and with the row-scale kernels off,
#      side by side; steps run only their tokens' adapter paths; eager steps apply scales with kernels.row_scale
#   2. HRA compiled beside our compiled LoRA, with T of the WY form by the product form (default under compile) and
#      by the triangular solve (PEFTLAB_WY_SERIES_MAX=0), one fresh process each
#   OUT=... bench/gpu/unmeasured.sh     (writes $OUT/serve*, $OUT/hra_series/*, $OUT/hra_solve/*)
set -x
OUT=${OUT:-/tmp/unmeasured}
mkdir -p "$OUT"
OUT="$OUT" bash bench/gpu/serve.sh
METHODS=lora,hra IMPLS=peftlab_compiled BUDGET=150 OUT="$OUT/hra_series" bash bench/gpu/speed_methods_compiled.sh
PEFTLAB_WY_SERIES_MAX=0 METHODS=hra IMPLS=peftlab_compiled BUDGET=120 OUT="$OUT/hra_solve" \
  bash bench/gpu/speed_methods_compiled.sh
exit 0
