#!/usr/bin/env bash
# Prepared in the fourteenth session (2026-12-05, no GPU lent), not yet run: the PEFT methods added that session,
# step time and peak memory against PEFT's own implementation on the 1B shape (B4 x 1024, r16 all linear), one
# process per row, peftlab as the trainer runs it on CUDA (compiled layers). Three H200 calls of <= ~9.5 min, nothing
# carried. Methods whose PEFT side cannot run are recorded by train_step.py with the reason.
#   OUT=... bench/gpu/new_methods.sh a   # fourierft c3a vblora randlora delora road
#   OUT=... bench/gpu/new_methods.sh b   # gralora miss shira hira glora deft
#   OUT=... bench/gpu/new_methods.sh c   # psoft osf adamss ln_tuning (and the rest of the session's additions)
#   OUT=... bench/gpu/new_methods.sh d   # waveft miss_bat frod supertuning: with a, b the dense-update fast path
#   OUT=... bench/gpu/new_methods.sh e   # glora shira deft c3a: after their changes on 2026-12-06 (a, b ran then)
#   OUT=... bench/gpu/new_methods.sh f   # delora road: what part a left on 2026-12-06
#   OUT=... bench/gpu/new_methods.sh g   # adamss: after its packed parameters (part c's row ran past 80 s and 270 s
#                                        # compiling a graph per layer on 2026-12-06)
set -x
PART=${1:?usage: bench/gpu/new_methods.sh a|b|c|d|e|f|g}
OUT=${OUT:-/tmp/new-methods}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case "$PART" in
  a) METHODS=fourierft,c3a,vblora,randlora,delora,road ;;
  b) METHODS=gralora,miss,shira,hira,glora,deft ;;
  c) METHODS=${METHODS_C:-psoft,osf,adamss,ln_tuning} ;;
  d) METHODS=waveft,miss_bat,frod,supertuning ;;
  e) METHODS=glora,shira,deft,c3a ;;  # twentieth session: after their changes (C3A: the dense-update node)
  f) METHODS=delora,road ;;  # what part a left on 2026-12-06 (DeLoRA's PEFT row, RoAd)
  g) METHODS=adamss ;;  # twenty-second session: one graph for all layers (packed A and B)
  *) echo "unknown part $PART (a, b, c, d, e, f or g)"; exit 2 ;;
esac
timeout 560 python3 bench/train_step.py --shape 1b --methods "$METHODS" --impls peftlab_compiled,peft \
  --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 80 --out "$OUT/new_$PART.json" > "$OUT/new_$PART.log" 2>&1
grep -E '^\[|rror|kip' "$OUT/new_$PART.log" | tail -40
exit 0
