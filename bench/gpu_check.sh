#!/usr/bin/env bash
# The GPU checks of the trainer in one run on a lent GPU machine (device tool), about 9 minutes:
#   1. test_train.py's single-process tests on CUDA (the trainer takes cuda when it sees one):
#      exact resume (also after a SIGTERM), bf16/fp16 autocast, evaluation while training, the
#      tiny model learning;
#   2. bench/train.py --device cuda: recap vs open_clip_train, bf16, samples/s and the ratio;
#   3. bench/learning.py --device cuda: shape with GPU-sized batches and steps.
# Here first: bash bench/gpu_wheels.sh (the wheels the machine lacks, into the git-ignored .whl/).
# Then, through the device tool, with carry [".whl"]:
#   bash bench/gpu_check.sh
# Logs and a summary go to $OUT (the device tool brings that folder back). QUICK=1 shrinks every
# step, to try the script on a CPU machine (PY=.venv/bin/python QUICK=1 bash bench/gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import open_clip, pydantic, webdataset" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  cp=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl ".whl/$cp"/*.whl || { echo "wheel install failed ($cp)" | tee "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if compgen -G ".whl/oc/*.whl" >/dev/null && [ ! -d bench/.openclip-deps/webdataset-0.2.86.dist-info ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target bench/.openclip-deps .whl/oc/*.whl
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
(nvidia-smi -L 2>&1; "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())") | tee "$OUT/machine.txt"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

if [ "${QUICK:-0}" = 1 ]; then
  dev=cpu; tb=(--steps 6 --warmup 2 --batch-size 16 --workers 1 --threads 2 --repeat 1)
  lb=(--steps 20 --batch-size 32 --workers 1 --train-samples 600 --eval-samples 140)
else
  dev=cuda; tb=(--steps 80 --warmup 20 --batch-size 256 --workers 8 --threads 4 --repeat 1)
  lb=(--steps 1500 --batch-size 256 --workers 8 --threads 4)
fi
step cuda_tests 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py \
  -k "resume_is_exact or mixed_precision or evaluation_during or learns or gradient_checkpointing or non_finite or sigterm"
step train_bench 150 "$PY" bench/train.py --device "$dev" --model recap-tiny "${tb[@]}"
step learning 230 "$PY" bench/learning.py --device "$dev" --models recap-tiny-cnn "${lb[@]}"
cat "$OUT/summary.txt"
