#!/usr/bin/env bash
# GPU check of kontext-lora on one CUDA GPU (about 5 minutes; every stage has its own time limit).
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
#
# 1. Uses the current Python if its torch sees a GPU; otherwise makes .venv-gpu and installs the
#    project with the CUDA build of torch from PyPI (`pip install torch==2.13.0 -e .`).
# 2. Builds the tiny FLUX.1 Kontext (into $KONTEXT_LORA_CACHE, default ./.gpu-check-cache).
# 3. Trains the tiny model through the trainer's own code at 512 and 1024 px in bf16 on CUDA with the
#    geometry losses on and off (interleaved), caching on vs off, and a one-step profile: step times,
#    on/off ratios, peak CUDA memory (benchmarks/bench_train_step.py).
# 4. The geometry losses and the signed distance map on the GPU against SciPy (benchmarks/bench_losses.py).
# 5. Runs the CUDA-only tests (bitsandbytes NF4 base, when the `quantization` extra installs).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }

PY=${PYTHON:-python3}
stage "python and torch"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  stage "installing torch (CUDA build) and the project into .venv-gpu"
  "$PY" -m venv .venv-gpu
  # shellcheck disable=SC1091
  . .venv-gpu/bin/activate
  PY=python
  timeout 300 pip install -q "torch==2.13.0" -e ".[dev]"
fi
if ! "$PY" -c "import diffusers, transformers, peft, accelerate, scipy, safetensors, yaml, pytest" 2>/dev/null; then
  timeout 240 "$PY" -m pip install -q -e ".[dev]"
fi
"$PY" - <<'PYEOF'
import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: this check needs one")
print("device", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

export KONTEXT_LORA_CACHE=${KONTEXT_LORA_CACHE:-$PWD/.gpu-check-cache}
stage "tiny model"
timeout 120 "$PY" -c "from kontext.tiny.model import tiny_model_path; print(tiny_model_path(progress=False))"

stage "train step: tiny model, bf16 on CUDA, 512 and 1024 px, geometry on/off, caching on/off, profile"
timeout 240 "$PY" benchmarks/bench_train_step.py --dtype bfloat16 --resolutions 512 1024 \
  --repeats 3 --steps 5 --cache-resolution 1024 --profile-resolution 1024

stage "geometry losses and SDM: torch on the GPU vs SciPy"
timeout 120 "$PY" benchmarks/bench_losses.py --repeats 20

stage "CUDA-only tests"
timeout 120 "$PY" -m pip install -q -e ".[quantization]" || echo "bitsandbytes did not install; its test will skip"
timeout 120 "$PY" -m pytest -q -rs tests/test_quantization.py

stage "done"
