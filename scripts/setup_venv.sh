#!/usr/bin/env bash
# Creates or refreshes .venv: CPU torch first where no GPU is present (a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build), then the package in editable mode with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    pip install "torch==$TORCH_VERSION"
  elif ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-"$TORCH_VERSION"+cpu-* >/dev/null 2>&1; then
    echo "[setup] no GPU: installing the local CPU build of torch==$TORCH_VERSION"
    pip install "torch==$TORCH_VERSION"
  else
    echo "[setup] no GPU: installing torch==$TORCH_VERSION from the PyTorch CPU index"
    pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
stamp=.venv/.potluck-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing potluck and its dependencies into .venv"
  pip install -e ".[dev]"
  touch "$stamp"
fi
