#!/usr/bin/env bash
# Twenty-first session (2026-12-06): issue 14's "peak memory <= PEFT + Liger's" is missed by prompt tuning and P-tuning
# (1.04x) although a compiled layer keeps per token what Liger's eager layer keeps (bench/pointwise_cpu.py): where is
# the rest? Prompt tuning and LoRA, ours and PEFT + Liger's: each row records the CUDA allocator's trace over 3
# warm-up + 2 steps and stores what is alive at its peak, by allocating line, and in which step it came
# (bench/peak_where.py; no timing: recording stacks slows the host).
# Then the rows the twenty-first session's liger calls left: prefix tuning after compile_model's recompile-limit
# fix (every layer compiled; was 63.06 ms / 7.05 GiB with eight of sixteen eager), LLaMA-Adapter (compiled in layers
# since the hook-guard fix, torch's default mode), AdaLoRA, Tied-LoRA, timed. One call, <= ~10 min, carry
# .gpu_liger.   -> $OUT/peak_where.json, $OUT/no_autotune.json, $OUT/liger_rest.json
set -x
OUT=${OUT:-/tmp/peak-where}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/.gpu_liger:$PWD
env PEFTLAB_BENCH_PEAK_WHERE=1 timeout 240 python3 bench/train_step.py --shape 1b \
  --methods prompt_tuning,lora --impls peftlab_compiled,peft_liger --steps 2 --warmup 3 --repeats 1 \
  --prime 0 --timeout 70 --out "$OUT/peak_where.json" 2>&1 | grep -E '^\[|rror'
python3 -c "
import json, sys
for run in json.load(open(sys.argv[1]))['runs']:
    w = run.get('peak_where') or {}
    w = w[-1] if isinstance(w, list) else w
    print(run.get('method'), run.get('impl'), run.get('peak_gib'), w.get('peak_phase'), w.get('peak_frames'))
    for g in w.get('live', [])[:8]:
        print('   ', g['mib'], 'MiB', g['tensors'], g['where'][:160])
" "$OUT/peak_where.json"
# twenty-fifth session: ours peaked in warm-up step 0 while inductor benchmarked a kernel's launch configurations;
# the same step without autotuning pointwise kernels (one heuristic configuration each), PEFT + Liger's beside
env PEFTLAB_BENCH_INDUCTOR=triton.autotune_pointwise=0 timeout 200 python3 bench/train_step.py --shape 1b \
  --methods prompt_tuning --impls peftlab_compiled,peft_liger --steps 10 --warmup 3 --repeats 1 --prime 0 \
  --timeout 70 --out "$OUT/no_autotune.json" 2>&1 | grep -E '^\[|rror'
timeout 300 python3 bench/train_step.py --shape 1b --methods prefix_tuning,adaption_prompt,adalora,tied_lora \
  --impls peftlab_compiled,peft_liger --steps 10 --warmup 3 --repeats 1 --prime 0 --timeout 75 \
  --out "$OUT/liger_rest.json" 2>&1 | grep -E '^\[|rror|kip'
exit 0
