#!/usr/bin/env bash
# Checks that stable_dfl travels as a wheel and an sdist:
#  - `pip wheel --no-build-isolation --no-deps .` with an environment's torch gives a wheel
#    that, installed in a fresh environment with the same torch, passes
#    `python -m stable_dfl doctor` under every CPU level this machine runs, each level
#    reported by `info --json` as the one in use;
#  - the sdist carries every file under csrc/ (headers included).
#
#   bash scripts/check_wheel.sh [BUILD_VENV]   (default: .venv in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
BUILD_PY="$BUILD_VENV/bin/python"
OUT="$ROOT/build/wheel-check"
rm -rf "$OUT"
mkdir -p "$OUT/dist"
PIP_QUIET=(--disable-pip-version-check -q)

echo "[stable_dfl] building the wheel and the sdist with $BUILD_PY"
(cd "$ROOT" && "$BUILD_PY" -m pip wheel "${PIP_QUIET[@]}" --no-build-isolation --no-deps . -w "$OUT/dist")
(cd "$ROOT" && "$BUILD_PY" setup.py -q sdist -d "$OUT/dist" >/dev/null 2>&1)
WHEEL="$(ls "$OUT"/dist/stable_dfl-*.whl)"
SDIST="$(ls "$OUT"/dist/stable_dfl-*.tar.gz)"

echo "[stable_dfl] the sdist carries every kernel source and header"
tar -tzf "$SDIST" | sed 's|^[^/]*/||' >"$OUT/sdist_files.txt"
missing="$(cd "$ROOT" && find csrc -type f | LC_ALL=C sort | grep -Fxv -f "$OUT/sdist_files.txt" || true)"
if [ -n "$missing" ]; then
  echo "[stable_dfl] FAIL: $SDIST lacks: $missing"
  exit 1
fi

TORCH_DIST_VERSION="$("$BUILD_PY" -c "import importlib.metadata as m; print(m.version('torch'))")"
echo "[stable_dfl] installing $(basename "$WHEEL") with torch==$TORCH_DIST_VERSION in a fresh environment"
python3 -m venv "$OUT/venv"
PY="$OUT/venv/bin/python"
"$PY" -m pip install "${PIP_QUIET[@]}" "torch==$TORCH_DIST_VERSION"
"$PY" -m pip install "${PIP_QUIET[@]}" "$WHEEL"

# Away from the source tree, so that only the installed wheel can be imported.
cd "$OUT"
LEVELS="$("$PY" -c "
from stable_dfl.ops import backends
print(' '.join(backends.runnable_cpu_levels()) or 'none')
")"
if [ "$LEVELS" = "none" ]; then
  echo "[stable_dfl] FAIL: the installed wheel's extension does not load"
  "$PY" -m stable_dfl info
  exit 1
fi
for level in $LEVELS; do
  echo "[stable_dfl] doctor under ATEN_CPU_CAPABILITY=$level"
  in_use="$(ATEN_CPU_CAPABILITY="$level" "$PY" -m stable_dfl info --json |
    "$PY" -c "import json, sys; print(json.load(sys.stdin)['cpu_kernel_isa'])")"
  if [ "$in_use" != "$level" ]; then
    echo "[stable_dfl] FAIL: ATEN_CPU_CAPABILITY=$level runs the $in_use kernels"
    exit 1
  fi
  ATEN_CPU_CAPABILITY="$level" "$PY" -m stable_dfl doctor
done
echo "[stable_dfl] the wheel passes doctor under: $LEVELS"
