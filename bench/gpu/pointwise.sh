#!/usr/bin/env bash
# Seventeenth session (2026-12-05), not yet run: LoRA with TrainArgs.recompute_pointwise for real. The row of that
# session's graphs_next.sh call ran without the flag (the worker entered its context manager without keeping it, so
# the layers were unwrapped at once; fixed, and the record now says whether the layers were still wrapped after the
# steps: versions.recompute_pointwise). The CPU count says ~1.5 GiB less at this shape
# (bench/results/pointwise_cpu_2026-12-05.json): does it meet LoRA's memory target (<= 0.9x Unsloth's 6.79 GiB) at
# the default's time? If so, make it the default. Then DoRA with and without it. One call, <= ~8 min, carry
# .unsloth_site.   -> $OUT/lora.json, $OUT/peers.json, $OUT/dora.json
set -x
OUT=${OUT:-/tmp/pointwise}
mkdir -p "$OUT"
# the plain compiled rows without the pointwise recompute (the default for most methods since the twenty-third session)
export PEFTLAB_BENCH_POINTWISE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 200 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods lora \
  --impls peftlab_compiled_pointwise,peftlab_compiled,peftlab_compiled_budget --prime 0 --timeout 65 \
  --out "$OUT/lora.json" 2>&1 | grep -E '^\[|rror'
timeout 170 python3 bench/train_step.py --unsloth-site "${UNSLOTH_SITE:-$PWD/.unsloth_site}" --steps 10 --warmup 3 \
  --repeats 1 --shape 1b --methods lora --impls unsloth --prime 0 --timeout 150 --out "$OUT/peers.json" 2>&1 \
  | grep -E '^\[|rror|kip'
timeout 150 python3 bench/train_step.py --steps 10 --warmup 3 --repeats 1 --shape 1b --methods dora \
  --impls peftlab_compiled,peftlab_compiled_pointwise --prime 0 --timeout 70 --out "$OUT/dora.json" 2>&1 \
  | grep -E '^\[|rror'
python3 -c "import json; [print(r['impl'], r['method'], r.get('versions', {}).get('recompute_pointwise')) for f in ('lora', 'dora') for r in json.load(open('$OUT/' + f + '.json'))['runs']]"
exit 0
