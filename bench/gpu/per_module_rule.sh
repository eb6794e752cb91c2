#!/usr/bin/env bash
# Twenty-seventh session (2026-12-07): the pointwise recompute's per-module rule (train/pointwise.py, the default since
# 13ce7cc; PEFTLAB_POINTWISE_SAVE_SMALL=0 is the old rule) for the other methods that take the recompute: measured for
# DoRA and LoRA only (twenty-sixth session, H200). Each part: its methods with the old rule, then with the new one, in
# one call. Nothing carried; part a ~6 min, part b ~7 min (1B rows compile ~30-50 s each).
#   PART=a|b  -> $OUT/rule_${PART}_{old,new}.json
set -x
OUT=${OUT:-/tmp/per-module-rule}
PART=${PART:-a}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case $PART in
  a) METHODS=vera,tied_lora,adalora ;;
  b) METHODS=loha,lokr,oft,hra ;;
  *) echo "PART must be a or b" >&2; exit 2 ;;
esac
for rule in old:0 new:1; do
  env PEFTLAB_POINTWISE_SAVE_SMALL=${rule#*:} timeout 280 python3 bench/train_step.py --shape 1b --methods "$METHODS" \
    --impls peftlab_compiled --steps 20 --warmup 3 --repeats 1 --prime 0 --timeout 90 \
    --out "$OUT/rule_${PART}_${rule%%:*}.json" 2>&1 | grep -E '^\[|rror'
done
exit 0
