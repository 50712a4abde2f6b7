"""README's benchmark tables are the results files' content, never typed in."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_the_benchmark_results():
    check = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_tables.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert "agrees with" in check.stdout and "0 results" not in check.stdout
