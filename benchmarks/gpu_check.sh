#!/usr/bin/env bash
# GPU check of kontext-lora on one CUDA GPU: under 10 minutes in all (GPU_CHECK_BUDGET seconds, default 590,
# counted once the environment is ready). Every stage runs under `timeout` with the smaller of its own limit
# and the time left; a stage that fails or times out is reported and the next one runs; the exit status is
# non-zero if any stage failed.
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
#
# 0. Uses the current Python if its torch sees a GPU; otherwise makes .venv-gpu and installs the project with
#    the CUDA build of torch from PyPI (`pip install torch==2.13.0 -e .`; a one-off download, outside the budget).
# 1. Builds the tiny FLUX.1 Kontext (into $KONTEXT_LORA_CACHE, default ./.gpu-check-cache)            (<= 60 s)
# 2. Installs bitsandbytes (the `quantization` extra) for the NF4 rows and the CUDA-only tests        (<= 60 s)
# 3. Real scale (benchmarks/real_scale.py): the full 12 B FLUX.1 Kontext transformer with random bf16
#    weights, the default LoRA, the trainer's compute_loss at 1024 px with the context image: s/step,
#    MFU, peak CUDA memory; gradient checkpointing off/on, bf16 and NF4 base; one table            (<= 300 s)
# 4. Trains the tiny model through the trainer's own code at 512 and 1024 px in bf16 on CUDA with the
#    geometry losses on and off (interleaved), caching on vs off, and a one-step profile: step times,
#    on/off ratios, peak CUDA memory (benchmarks/bench_train_step.py)                              (<= 120 s)
# 5. The geometry losses and the signed distance map on the GPU against SciPy (bench_losses.py)    (<= 45 s)
# 6. Runs the CUDA-only tests (bitsandbytes NF4 base)                                              (rest, <= 60 s)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${GPU_CHECK_BUDGET:-590}
START=$(date +%s)
FAILED=()
stage() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run LIMIT NAME CMD...: CMD under `timeout` for min(LIMIT, time left); records a failure, never exits.
run() {
  local limit=$1 name=$2; shift 2
  local l; l=$(left)
  (( l < limit )) && limit=$l
  if (( limit < 10 )); then
    echo "!!! $name: not run, the ${BUDGET} s budget is spent"; FAILED+=("$name (not run)"); return 0
  fi
  local rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if (( rc == 124 || rc == 137 )); then
    echo "!!! $name: timed out after $limit s"; FAILED+=("$name (timeout)")
  elif (( rc != 0 )); then
    echo "!!! $name: exit status $rc"; FAILED+=("$name (exit $rc)")
  fi
  return 0
}

PY=${PYTHON:-python3}
stage "python and torch"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  stage "installing torch (CUDA build) and the project into .venv-gpu (outside the time budget)"
  "$PY" -m venv .venv-gpu
  # shellcheck disable=SC1091
  . .venv-gpu/bin/activate
  PY=python
  timeout 300 pip install -q "torch==2.13.0" -e ".[dev]" || { echo "install failed"; exit 1; }
fi
if ! "$PY" -c "import diffusers, transformers, peft, accelerate, scipy, safetensors, yaml, pytest" 2>/dev/null; then
  timeout 240 "$PY" -m pip install -q -e ".[dev]" || { echo "install failed"; exit 1; }
fi
START=$(date +%s)  # the budget counts from here
"$PY" - <<'PYEOF' || exit 1
import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: this check needs one")
print("device", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

export KONTEXT_LORA_CACHE=${KONTEXT_LORA_CACHE:-$PWD/.gpu-check-cache}
export PYTHONUNBUFFERED=1
stage "tiny model"
run 60 "tiny model" "$PY" -c "from kontext.tiny.model import tiny_model_path; print(tiny_model_path(progress=False))"

stage "bitsandbytes (the quantization extra) for the NF4 rows and tests"
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  echo "bitsandbytes already installed"
else
  # Optional: without it the NF4 rows and test report themselves as skipped (not a failure of the check).
  timeout --kill-after=10 60 "$PY" -m pip install -q -e ".[quantization]" \
    || echo "bitsandbytes did not install; the NF4 rows and its test will be skipped"
fi

stage "real scale: 12 B FLUX.1 Kontext transformer (random bf16 weights), default LoRA, 1024 px + context"
# Its own budget leaves 40 s for the last worker's kill grace and the table.
RS_LIMIT=300
(( $(left) - 110 < RS_LIMIT )) && RS_LIMIT=$(( $(left) - 110 ))  # keep ~110 s for stages 4-6
(( RS_LIMIT < 60 )) && RS_LIMIT=60
run "$RS_LIMIT" "real scale" "$PY" benchmarks/real_scale.py --resolution 1024 --steps 3 --warmup 2 \
  --variants dense dense-ckpt nf4 nf4-ckpt --variant-time-limit 100 --time-budget $(( RS_LIMIT - 40 ))

stage "train step: tiny model, bf16 on CUDA, 512 and 1024 px, geometry on/off, caching on/off, profile"
run 120 "tiny train step" "$PY" benchmarks/bench_train_step.py --dtype bfloat16 --resolutions 512 1024 \
  --repeats 2 --steps 4 --cache-resolution 1024 --profile-resolution 1024 --skip checkpointing

stage "geometry losses and SDM: torch on the GPU vs SciPy"
run 45 "losses on the GPU" "$PY" benchmarks/bench_losses.py --repeats 10

stage "CUDA-only tests"
run 60 "CUDA-only tests" "$PY" -m pytest -q -rs tests/test_quantization.py

stage "done"
if (( ${#FAILED[@]} )); then
  printf 'failed or not run: %s\n' "${FAILED[@]}"
  exit 1
fi
