"""The CPU kernels of every SIMD level: which one runs, forcing a lower one, and that the code
every CPU executes (registration, dispatch, the default level) holds no AVX instruction."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stable_dfl
from stable_dfl.ops import backends

pytestmark = pytest.mark.skipif(
    backends.extension_error() is not None, reason=f"stable_dfl._C: {backends.extension_error()}"
)

LEVELS = backends.CPU_LEVELS
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
PACKAGE_DIR = Path(stable_dfl.__file__).parent


def machine_levels() -> list[str]:
    """The levels this machine runs: up to the one in use without ATEN_CPU_CAPABILITY."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "from stable_dfl.ops import backends; print(' '.join(backends.runnable_cpu_levels()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1].split()


def info_json(level: str | None, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if level is not None:
        env["ATEN_CPU_CAPABILITY"] = level
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, "-m", "stable_dfl", "info", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=pythonpath or Path.cwd(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_every_level_built_is_installed_and_reported():
    from stable_dfl import _build_info

    # All three on x86 unless STABLE_DFL_CPU_ISAS narrowed the build; default always.
    assert "default" in _build_info.CPU_ISAS
    if not IS_X86:
        assert _build_info.CPU_ISAS == ("default",)
    assert backends.cpu_kernel_isas() == _build_info.CPU_ISAS
    assert backends.cpu_kernel_isa() in _build_info.CPU_ISAS


@pytest.mark.parametrize("level", LEVELS)
def test_forcing_a_level_runs_that_levels_kernels(level: str):
    if level not in machine_levels():
        pytest.skip(f"this CPU does not run {level}")
    info = info_json(level)
    # The level comes from the loaded library itself, not from the variable.
    assert info["cpu_kernel_isa"] == level
    assert (
        info["aten_cpu_capability"]
        .lower()
        .startswith(
            {"default": ("default", "no avx"), "avx2": ("avx2",), "avx512": ("avx512",)}[level]
        )
    )
    cpu = next(row for row in info["backends"] if row["backend"] == "cpu")
    assert cpu["usable"] and cpu["agreement"]["ok"], cpu


def test_info_json_names_versions_backends_and_levels():
    info = info_json(None)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["stable_dfl"] == stable_dfl.__version__
    assert info["cpu_kernel_isa"] == machine_levels()[-1]
    assert info["cpu_kernel_isas"] == list(backends.cpu_kernel_isas())
    assert {row["backend"] for row in info["backends"]} >= {"cpu", "reference"}
    assert info["ok"] is True


@pytest.mark.skipif(not IS_X86, reason="only x86 has levels above default")
def test_a_missing_level_falls_back_to_the_next_lower_one(tmp_path: Path):
    """An install narrowed to fewer levels (STABLE_DFL_CPU_ISAS) still runs on every CPU."""
    top = machine_levels()[-1]
    if top == "default":
        pytest.skip("this CPU runs only the default level")
    copy = tmp_path / "stable_dfl"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for library in copy.glob(f"_cpu_kernels_{top}.*"):
        library.unlink()
    info = info_json(None, pythonpath=tmp_path)
    lower = LEVELS[LEVELS.index(top) - 1]
    assert info["cpu_kernel_isa"] == lower
    assert top not in info["cpu_kernel_isas"]


# VEX/EVEX-encoded instructions (AVX and later) name ymm/zmm registers, or are the
# v-prefixed forms on xmm registers; SSE2 code is neither.
AVX_INSTRUCTION = re.compile(r"%[yz]mm\d|\tv[a-z0-9]+\s+.*%xmm\d")


def avx_instructions(library: Path) -> list[str]:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return [line for line in out.stdout.splitlines() if AVX_INSTRUCTION.search(line)]


@pytest.mark.skipif(not IS_X86, reason="x86 instruction sets")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("name", ["_C", "_cpu_kernels_default"])
def test_code_that_every_cpu_runs_has_no_avx_instruction(name: str):
    (library,) = PACKAGE_DIR.glob(f"{name}.*.so")
    found = avx_instructions(library)
    assert not found, f"{library.name} would not run on a CPU without AVX: {found[:5]}"


@pytest.mark.skipif(not IS_X86, reason="x86 instruction sets")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_the_avx512_library_really_uses_avx512():
    (library,) = PACKAGE_DIR.glob("_cpu_kernels_avx512.*.so")
    assert any("%zmm" in line for line in avx_instructions(library))
