"""`python -m stable_dfl info` and the behaviour when the compiled extension is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stable_dfl
from stable_dfl.ops import backends


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_info_lists_backends_and_checks_agreement():
    out = subprocess.run(
        [sys.executable, "-m", "stable_dfl", "info"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch" in out.stdout
    assert "reference on cpu   OK" in out.stdout
    if backends.compiled_available("cpu"):
        assert "cpu on cpu   OK" in out.stdout
    assert "cuda on cpu   not usable" in out.stdout


def run_info_json(**environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stable_dfl", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **environment},
    )


@pytest.mark.skipif(not backends.compiled_available("cpu"), reason="needs stable_dfl._C")
def test_info_reports_the_cpu_block_cache_limit_and_a_refused_setting():
    out = run_info_json(STABLE_DFL_CPU_CACHE_MB="64")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cpu_block_cache"] == {"limit_bytes": 64 << 20, "error": None}
    out = run_info_json(STABLE_DFL_CPU_CACHE_MB="64MB")
    cache = json.loads(out.stdout)["cpu_block_cache"]
    assert cache["limit_bytes"] is None
    assert (
        "STABLE_DFL_CPU_CACHE_MB must be a whole number of MiB >= 0, got '64MB'" in cache["error"]
    )


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


def test_without_extension_there_is_no_cpu_block_cache_to_size():
    code = (
        "import sys, warnings\n"
        "sys.modules['stable_dfl._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import stable_dfl\n"
        "assert stable_dfl.cpu_block_cache_info() is None\n"
        "stable_dfl.empty_cpu_block_cache()  # nothing kept, nothing to do\n"
        "try:\n"
        "    stable_dfl.set_cpu_block_cache_limit(0)\n"
        "except stable_dfl.BackendUnavailableError as error:\n"
        "    print(error)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "the compiled extension stable_dfl._C is not loaded" in out.stdout


def test_extension_built_for_another_torch_is_refused_in_one_line(tmp_path):
    """An install whose _C was compiled against another torch is not loaded (an undefined
    symbol at best): one line says so and what to do, and the package runs on the reference."""
    copy = tmp_path / "stable_dfl"
    shutil.copytree(
        Path(stable_dfl.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / "_build_info.py").write_text(
        "TORCH_VERSION = '1.0.0+other'\nCPU_ISAS = ('default',)\nWITH_CUDA = False\n"
    )
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, stable_dfl\n"
        "    from stable_dfl.ops import backends\n"
        "print(backends.extension_error())\n"
        "assert any(backends.extension_error() in str(w.message) for w in caught)\n"
        "loss = stable_dfl.StableDFLLoss()\n"
        "loss(torch.zeros(3, 16), torch.full((3,), 7.5))\n"
        "print(loss.last_backend)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    message, backend = out.stdout.strip().splitlines()
    assert message == (
        f"stable_dfl._C was built for torch 1.0.0+other, this is torch {torch.__version__}: "
        "reinstall stable_dfl"
    )
    assert backend == "reference"
