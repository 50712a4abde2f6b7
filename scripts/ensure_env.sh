#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs stable_dfl into it, editable,
# with its compiled extension. Extra arguments name pip extras to install as well
# (e.g. `test`, `bench`).
#
#   VENV=PATH        the environment (default: .venv in the repository root)
#   TORCH_SPEC=SPEC  the torch to install, e.g. "torch==2.13.0" (default: the newest torch
#                    that pyproject allows, installed only when there is none)
#
# A second run with nothing changed takes seconds: the install is skipped when a stamp of
# everything it depends on (sources, build files, torch, python, build variables, extras)
# matches the last one. When something changed, the rebuild is incremental: objects are
# kept in build/temp-<python>-<torch>/ (setup.py) and ninja recompiles what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
DEFAULT_TORCH_SPEC="torch>=2.13,<2.15"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[stable_dfl] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-2}"
EXTRAS=""
if [ "$#" -gt 0 ]; then EXTRAS="[$(IFS=,; echo "$*")]"; fi

# Everything the installed state depends on, without starting Python: the hash of the
# build inputs, torch's recorded version, the build variables, and the installed outputs.
source_hash() {
  (
    cd "$ROOT"
    {
      ls setup.py pyproject.toml MANIFEST.in scripts/ensure_env.sh
      find csrc -type f
    } | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
  )
}
install_stamp() {
  {
    echo "root=$ROOT venv=$VENV torch_spec=${TORCH_SPEC:-}"
    for var in STABLE_DFL_CUDA STABLE_DFL_CUDA_ARCH_LIST TORCH_CUDA_ARCH_LIST \
      STABLE_DFL_CPU_ISAS CUDA_HOME CC CXX CFLAGS CXXFLAGS; do
      echo "$var=${!var:-}"
    done
    cat "$VENV"/lib/python*/site-packages/torch/version.py 2>/dev/null || echo "no torch"
    "$VENV/bin/python" -V 2>&1
    source_hash
    cd "$ROOT"
    # The outputs must still be there (a `git clean` removes them); a missing one changes
    # what ls prints, hence the stamp.
    ls stable_dfl/_build_info.py stable_dfl/_C.*.so stable_dfl/_cpu_kernels_*.so 2>&1 || true
    ls -d "$VENV"/lib/python*/site-packages/__editable__*stable_dfl* 2>&1 || true
  } | sha256sum | cut -d' ' -f1
}
# The stamp file: the stamp, then the extras installed with it, one per line. The two README
# commands ask for different extras (train: none, tests: `test`); either is up to date when
# the stamp matches and its extras were installed with it.
STAMP_FILE="$VENV/.stable_dfl_install_stamp"
STAMP="$(install_stamp)"
SOURCES_BEFORE="$(source_hash)"
INSTALLED_EXTRAS=""
if [ -f "$STAMP_FILE" ] && [ "$(head -n1 "$STAMP_FILE")" = "$STAMP" ]; then
  INSTALLED_EXTRAS="$(tail -n +2 "$STAMP_FILE")"
  missing=""
  for extra in "$@"; do
    grep -qx "$extra" <<<"$INSTALLED_EXTRAS" || missing="$missing $extra"
  done
  if [ -z "$missing" ]; then
    echo "[stable_dfl] $VENV is up to date (nothing the build depends on changed)"
    exit 0
  fi
fi

# torch first: the build needs it (no build isolation, so the installed torch is used).
if [ -n "${TORCH_SPEC:-}" ]; then
  echo "[stable_dfl] installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
elif ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[stable_dfl] installing torch (a few minutes on a fresh machine)"
  "${PIP[@]}" install "$DEFAULT_TORCH_SPEC"
fi
"${PIP[@]}" install setuptools wheel ninja numpy

echo "[stable_dfl] building and installing stable_dfl$EXTRAS"
# Building the CUDA kernels needs nvcc and a CUDA build of torch; without them they are
# skipped (see setup.py).
(cd "$ROOT" && "${PIP[@]}" install --no-build-isolation -e ".$EXTRAS")

if [[ " $* " == *" test "* ]]; then
  # ultralytics for the drop-in parity tests, without its declared dependencies (matplotlib,
  # scipy, polars, ...): its loss and model code import only these. It reads torchvision's
  # version at import, so torchvision comes too, --no-deps so that it cannot replace torch
  # (0.29.x matches torch 2.14; other torch versions run those tests' skips).
  "${PIP[@]}" install opencv-python-headless pillow pyyaml
  TORCH_MINOR="$("$VENV/bin/python" -c "import torch; print('.'.join(torch.__version__.split('.')[:2]))")"
  if [ "$TORCH_MINOR" = "2.14" ]; then
    "${PIP[@]}" install --no-deps "torchvision==0.29.1"
    "${PIP[@]}" install --no-deps "ultralytics==8.4.190"
    # The mmdetection stack for the tests against the real library: mmdet asserts
    # mmcv < 2.2, and mmcv-lite is mmcv without its compiled ops (tests/support/mmcv_ops.py
    # stands in for them). --no-deps again, so that nothing replaces torch; then what they
    # import.
    "${PIP[@]}" install --no-deps "mmengine==0.10.7" "mmcv-lite==2.1.0" "mmdet==3.3.0"
    "${PIP[@]}" install addict yapf termcolor rich terminaltables pycocotools shapely scipy six tqdm
    # What ultralytics' own trainer imports besides its loss and model code (its trainer test).
    "${PIP[@]}" install polars psutil
  fi
fi
# A source edited while the build ran is not in this build: no stamp, so the next run rebuilds.
if [ "$(source_hash)" != "$SOURCES_BEFORE" ]; then
  echo "[stable_dfl] sources changed during the build: the next run rebuilds" >&2
  rm -f "$STAMP_FILE"
  exit 0
fi
{
  install_stamp
  { [ -n "$INSTALLED_EXTRAS" ] && echo "$INSTALLED_EXTRAS"; printf '%s\n' "$@"; } | sed '/^$/d' | sort -u
} >"$STAMP_FILE"
