#!/usr/bin/env bash
# Sets up .venv/ (see ensure_env.sh) and runs the test suite. Triton kernels run in
# Triton's interpreter when no GPU is present (tests/conftest.py). Extra arguments
# go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/ensure_env.sh" test
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -ra "$@"
