#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv/ in the repo root and installs
# stable_dfl into it with its compiled extension. Extra arguments name pip extras
# to install as well (e.g. `test`, `bench`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[stable_dfl] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# torch first: the build needs it (no build isolation, so the installed torch is used).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[stable_dfl] installing torch (a few minutes on a fresh machine)"
  "${PIP[@]}" install "torch>=2.4"
fi
"${PIP[@]}" install setuptools wheel ninja numpy

EXTRAS=""
if [ "$#" -gt 0 ]; then EXTRAS="[$(IFS=,; echo "$*")]"; fi
echo "[stable_dfl] building and installing stable_dfl$EXTRAS"
# Building the CUDA kernels needs nvcc; without it they are skipped (see setup.py).
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
(cd "$ROOT" && "${PIP[@]}" install --no-build-isolation -e ".$EXTRAS")

if [[ " $* " == *" test "* ]]; then
  # ultralytics for the drop-in parity tests, without its declared dependencies (matplotlib,
  # scipy, polars, ...): its loss and model code import only these. It reads torchvision's
  # version at import, so torchvision comes too, --no-deps so that it cannot replace torch
  # (0.29.x matches torch 2.14). Not a pyproject extra, since extras bring all deps.
  "${PIP[@]}" install opencv-python-headless pillow pyyaml
  TORCH_MINOR="$("$VENV/bin/python" -c "import torch; print('.'.join(torch.__version__.split('.')[:2]))")"
  if [ "$TORCH_MINOR" = "2.14" ]; then
    "${PIP[@]}" install --no-deps "torchvision==0.29.1"
  fi
  "${PIP[@]}" install --no-deps "ultralytics==8.4.190"
fi
