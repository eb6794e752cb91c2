#!/usr/bin/env bash
# Issue 14 (training speed) on one GPU, in two calls of <= 540 s each:
#   bench/gpu/speed.sh a   # 1B shape: lora dora loha lokr hra oft boft + full fine-tune   (~350-450 s)
#   bench/gpu/speed.sh b   # GPU tests, then lora adalora tied_lora ia3 vera prompt/prefix tuning + frozen base (~350-520 s)
# Each: peftlab (fused path, the default on CUDA), HF PEFT and PEFT + Liger side by side, one fresh
# process per configuration (--timeout per configuration); the results JSON is rewritten after every
# configuration, so the outer `timeout` leaves whatever finished. Writes under $OUT (3 files a call):
#   speed_1b_<part>.json  speed_<part>.log  (b also: speed_tests.log)
# Tables afterwards: python bench/train_step.py --table $OUT/speed_1b_a.json --readme bench/README.md
set -x
PART=${1:?usage: bench/gpu/speed.sh a|b}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
# SPEED_SHAPE / SPEED_METHODS / SPEED_EXTRA only for a CPU dry run of this script:
#   SPEED_SHAPE=tiny SPEED_METHODS=lora,full SPEED_EXTRA="--device cpu --steps 1 --warmup 0 --prime 0" OUT=/tmp/s bench/gpu/speed.sh a
SHAPE=${SPEED_SHAPE:-1b}
# SPEED_IMPLS: the implementations (default peftlab,peft,peft_liger; e.g. peftlab_compiled,peftlab,peft)
COMMON=(--shape "$SHAPE" --impls "${SPEED_IMPLS:-peftlab,peft,peft_liger}" --steps 10 --warmup 2 --repeats 1 --prime 1 --timeout 100)
case "$PART" in
  a) METHODS=lora,dora,loha,lokr,hra,oft,boft,full; BUDGET=500 ;;
  b) timeout 110 python3 -m pytest -q -rs -p no:cacheprovider tests/test_fast.py tests/test_factored.py -k cuda \
       > "$OUT/speed_tests.log" 2>&1 || echo "GPU tests failed or timed out (see speed_tests.log)"
     METHODS=lora,adalora,tied_lora,ia3,vera,prompt_tuning,prefix_tuning,frozen; BUDGET=410 ;;
  *) echo "unknown part $PART (a or b)"; exit 2 ;;
esac
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
  > "$OUT/speed_$PART.log" 2>&1
# shellcheck disable=SC2086  # SPEED_EXTRA is a list of options
timeout "$BUDGET" python3 bench/train_step.py "${COMMON[@]}" --methods "${SPEED_METHODS:-$METHODS}" $SPEED_EXTRA \
  --out "$OUT/speed_${SHAPE}_$PART.json" \
  >> "$OUT/speed_$PART.log" 2>&1 || echo "bench part $PART stopped early (see speed_$PART.log)"
tail -n 30 "$OUT/speed_$PART.log"
exit 0
