#!/usr/bin/env bash
# Creates .venv and installs driftsweep with its test extras.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (constraints/cpu.txt): a plain
# `torch` requirement would otherwise pull a multi-GB CUDA build. With a GPU, pip picks torch freely.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  constraint=(-c constraints/cpu.txt)
  echo "install: no GPU found, pinning the CPU build of torch (constraints/cpu.txt)"
fi
.venv/bin/python -m pip install --quiet "${constraint[@]}" -e '.[test]'
echo "install: done ($(.venv/bin/python -c 'import torch, ray, mlflow; print("torch", torch.__version__, "ray", ray.__version__, "mlflow", mlflow.__version__)'))"
