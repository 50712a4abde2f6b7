"""`python -m stable_dfl info` and the behaviour when the compiled extension is missing."""

from __future__ import annotations

import subprocess
import sys

from stable_dfl.ops import _library


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_info_lists_backends_and_checks_agreement():
    out = subprocess.run(
        [sys.executable, "-m", "stable_dfl", "info"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch" in out.stdout
    assert "reference on cpu   OK" in out.stdout
    if _library.compiled_cpu_available():
        assert "cpu on cpu   OK" in out.stdout
    assert "cuda on cpu   not usable" in out.stdout


def test_import_without_extension_warns_once_and_falls_back_to_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['stable_dfl._C'] = None  # makes `from stable_dfl import _C` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, stable_dfl\n"
        "    import stable_dfl.ops.dfl\n"
        "messages = [str(w.message) for w in caught if 'stable_dfl._C' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "print(messages[0])\n"
        "loss = stable_dfl.StableDFLLoss()\n"
        "print(float(loss(torch.zeros(3, 16), torch.full((3,), 7.5))), loss.last_backend)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "falling back" in out.stdout and "eager PyTorch reference" in out.stdout
    assert out.stdout.strip().endswith("reference")
