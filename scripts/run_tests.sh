#!/usr/bin/env bash
# Sets up .venv/ (see ensure_env.sh) and runs the test suite, then runs the tests of the
# compiled CPU kernels (marker cpu_kernel) again under each lower SIMD level this machine
# has, forced with ATEN_CPU_CAPABILITY, so that every level's kernels are tested wherever
# the suite runs. Triton kernels run in Triton's interpreter when no GPU is present
# (tests/conftest.py). Extra arguments go to every pytest run.
#
#   VENV=PATH   the environment to test in (default: .venv in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
VENV="$VENV" bash "$ROOT/scripts/ensure_env.sh" test
cd "$ROOT"
PYTHON="$VENV/bin/python"

# The level in use now, as the loaded kernels report it, and the levels below it.
read -r IN_USE LOWER <<<"$("$PYTHON" -c "
from stable_dfl.ops import backends
levels = backends.runnable_cpu_levels()
print(levels[-1] if levels else 'none', ' '.join(levels[:-1]))
" 2>/dev/null)"

# torch.compile's kernel cache, one per level: inductor reuses C++ it generated for one
# ATEN_CPU_CAPABILITY under another, where it does not compile.
echo "[stable_dfl] tests, CPU kernels at the level this machine uses ($IN_USE)"
TORCHINDUCTOR_CACHE_DIR="$ROOT/build/inductor-cache/$IN_USE" "$PYTHON" -m pytest -q -ra "$@"
for level in $LOWER; do
  echo "[stable_dfl] CPU kernel tests under ATEN_CPU_CAPABILITY=$level"
  ATEN_CPU_CAPABILITY="$level" TORCHINDUCTOR_CACHE_DIR="$ROOT/build/inductor-cache/$level" \
    "$PYTHON" -m pytest -q -ra -m "cpu_kernel and not soak" "$@"
done
