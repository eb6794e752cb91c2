#!/usr/bin/env bash
# Twenty-second session (2026-12-06): the fused loss after three changes made on the CPU. (1) each chunk's logits
# are freed before the next chunk's product (the peak held two chunks: 2 x 128 MiB at the 1B shape, seen by
# peak_where.sh in prompt tuning's and LoRA's peaks); (2) the rows are a view of the hidden states (their shifted
# copy took 16 MiB); (3) chunks of 512 rows instead of 523 (a multiple of the GEMMs' row tiles). (1) and (2) change
# only memory; (3) may save part of the loss's GEMM time (22-47% of the row tiles were empty at 523 rows) and is
# A/B'd here against PEFTLAB_CE_CHUNK_ALIGN=1 (523 rows), alternating, two rounds. Prompt tuning's PEFT + Liger row
# beside (ours peaked at 1.04x its memory before). The memory half was measured in the twenty-third session
# (next23.sh: prompt tuning 5.73 GiB, 1.01x PEFT + Liger's; LoRA 7.29 without the pointwise recompute, now its
# default). One round and Liger's row <= ~6 min, carry .gpu_liger.
#   -> $OUT/ce_align<N>_mib<M>_<round>.json, $OUT/liger_prompt.json
set -x
OUT=${OUT:-/tmp/ce-next}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
# Twenty-third session: the final norm compiled with the layers saved 19 MiB (measured: next23.sh); these rows A/B
# the chunk's rows (512 against 523) and a 128 MiB chunk (256 rows: two full row tiles, against 131 rows' 6.7-8.4 ms
# cost; prompt tuning peaks at the loss, 1.01x PEFT + Liger's memory). Config align:mib. ROUNDS (default "1 2")
# splits the A/B over calls; LIGER=0 skips PEFT + Liger's row.
for round in ${ROUNDS:-1 2}; do
  for config in 256:256 1:256 256:128; do
    align=${config%:*} mib=${config#*:}
    env PEFTLAB_CE_CHUNK_ALIGN=$align PEFTLAB_CE_CHUNK_MIB=$mib timeout 170 python3 bench/train_step.py \
      --shape 1b --methods prompt_tuning,lora --impls peftlab_compiled --steps 10 --warmup 3 --repeats 1 --prime 0 \
      --timeout 80 --out "$OUT/ce_align${align}_mib${mib}_${round}.json" 2>&1 | grep -E '^\[|rror'
  done
done
[ "${LIGER:-1}" = 0 ] || timeout 90 python3 bench/train_step.py --shape 1b --methods prompt_tuning --impls peft_liger \
  --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 80 --out "$OUT/liger_prompt.json" 2>&1 | grep -E '^\[|rror'
exit 0
