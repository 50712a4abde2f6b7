#!/usr/bin/env bash
# Runs the CPU test suite against another torch than the main environment's (default: the
# oldest one pyproject claims, the CPU build torch==2.13.0), in an environment of its own.
#
# The tree is copied to build/other-torch/<torch>/src (tracked and unignored files, their
# times kept, so the build there stays incremental), because an editable install writes its
# compiled extension into the source tree, which the main environment's build occupies.
# Then, from the main tree, it checks that an extension built for another torch is refused
# in one line and the package falls back to the eager reference.
#
#   bash scripts/run_tests_other_torch.sh [TORCH_SPEC] [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${1:-torch==2.13.0}"
shift || true
TAG="$(echo "$TORCH_SPEC" | tr -c 'A-Za-z0-9.\n' '_')"
WORK="$ROOT/build/other-torch/$TAG"
SRC="$WORK/src"
VENV="$WORK/venv"

echo "[stable_dfl] copying the tree to $SRC"
mkdir -p "$SRC"
# Start from the tracked files only, keeping the build outputs (objects, the installed
# extension) so that nothing unchanged is rebuilt.
find "$SRC" -mindepth 1 \( -path "$SRC/build" -o -name '*.egg-info' \) -prune -o -type f \
  ! -name '*.so' ! -name '_build_info.py' -print0 | xargs -0 rm -f
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$SRC"

# A CPU build of torch: no CUDA kernels, whatever the caller's environment asks for.
export STABLE_DFL_CUDA=0
VENV="$VENV" TORCH_SPEC="$TORCH_SPEC" bash "$SRC/scripts/run_tests.sh" "$@"

echo "[stable_dfl] an extension built for another torch is refused in one line"
MAIN_BUILT_FOR="$(sed -n 's/^TORCH_VERSION = //p' "$ROOT/stable_dfl/_build_info.py" 2>/dev/null || true)"
if [ -z "$MAIN_BUILT_FOR" ]; then
  echo "[stable_dfl] skipped: the main tree holds no build ($ROOT/stable_dfl/_build_info.py)"
  exit 0
fi
(cd "$ROOT" && "$VENV/bin/python" - <<'EOF'
import warnings

import torch

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from stable_dfl import _build_info
    from stable_dfl.ops import backends
    import stable_dfl

expected = (
    f"stable_dfl._C was built for torch {_build_info.TORCH_VERSION}, this is torch "
    f"{torch.__version__}: reinstall stable_dfl"
)
if _build_info.TORCH_VERSION == torch.__version__:
    raise SystemExit("the main tree's build is for this same torch: nothing to check")
assert backends.extension_error() == expected, backends.extension_error()
assert any(expected in str(w.message) for w in caught), [str(w.message) for w in caught]
loss = stable_dfl.StableDFLLoss()
value = loss(torch.zeros(4, 16), torch.full((4,), 7.5))
assert loss.last_backend == "reference" and torch.isfinite(value), loss.last_backend
print(f"ok: {expected}; the loss ran on the reference")
EOF
)
