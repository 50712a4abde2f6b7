#!/usr/bin/env bash
# One command on a GPU machine: builds stable_dfl._C with its CUDA kernels for the GPU present,
# runs the GPU tests (CUDA and Triton backends), runs the GPU benchmark and prints a short
# table of its largest size last. About 5-8 minutes on an H100.
#
# Python: $PYTHON, else .venv/bin/python, else python3. It needs a CUDA build of torch, triton,
# pytest and matplotlib; `bash scripts/ensure_env.sh test triton` sets up .venv with them.
# `--quick` (meant for a few minutes of GPU time; not yet timed on a GPU) leaves out the tests
# marked slow (the inputs past 2**31 elements) and times the benchmark's small sizes only. Other
# arguments go to the benchmark.
set -euo pipefail
TEST_MARKS="cuda or triton"
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then TEST_MARKS="(cuda or triton) and not slow"; fi
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

"$PY" - <<'EOF'
import importlib.util, sys
import torch
missing = [m for m in ("triton", "pytest", "matplotlib") if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu.sh needs a visible CUDA GPU and {', '.join(missing) or 'nothing else'} "
             f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()})")
print(f"[gpu.sh] {torch.cuda.get_device_name()} | torch {torch.__version__}")
EOF

ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
echo "[gpu.sh] building stable_dfl._C for sm_${ARCH/./}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
STABLE_DFL_CUDA=1 STABLE_DFL_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" setup.py build_ext --inplace >/tmp/stable_dfl_build.log 2>&1 ||
  { tail -50 /tmp/stable_dfl_build.log; exit 1; }
"$PY" -c "import stable_dfl, torch, sys; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('stable_dfl::dfl_forward', 'CUDA') else 'the CUDA kernel did not register')"

echo "[gpu.sh] GPU tests"
"$PY" -m pytest -m "$TEST_MARKS" -q -ra -p no:cacheprovider

echo "[gpu.sh] benchmark"
"$PY" bench/bench_dfl_gpu.py "$@" | tee /tmp/stable_dfl_bench.log
TABLE="$(ls -t bench/results/dfl_gpu*.md | head -1)"
echo
echo "[gpu.sh] largest size, from $TABLE (full table above):"
LARGEST="$(grep -E '^\| (fp32|fp16|bf16) ' "$TABLE" | awk -F'|' '{gsub(/[ ,]/, "", $3); print $3}' | sort -n | tail -1)"
grep -E '^\|' "$TABLE" | head -2
grep -E '^\| (fp32|fp16|bf16) ' "$TABLE" | awk -F'|' -v n="$LARGEST" '{x = $3; gsub(/[ ,]/, "", x); if (x == n) print}'
