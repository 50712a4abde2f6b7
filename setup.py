"""Builds stable_dfl._C and the CPU kernel libraries from csrc/.

stable_dfl._C (schemas, registrations, the run-time choice of CPU kernels and, when
built, the CUDA kernels) is compiled for the baseline ISA. The CPU kernels (csrc/cpu/)
are compiled once per SIMD level into libraries of their own,
stable_dfl/_cpu_kernels_{default,avx2,avx512}, of which _C loads the best one that ATen
uses and the CPU runs (ATEN_CPU_CAPABILITY=default|avx2|avx512 forces a lower one).
The CUDA kernels (csrc/*.cu and csrc/*_cuda.cpp) build when the installed torch has CUDA
and nvcc is found. Objects are kept in build/temp-<python>-<torch>/ for incremental rebuilds.

Environment:
  STABLE_DFL_CUDA=1|0       force or skip the CUDA kernels (default: auto)
  STABLE_DFL_CUDA_ARCH_LIST architectures for nvcc, e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST,
                            else a list from Turing to Blackwell)
  STABLE_DFL_CPU_ISAS       comma list narrowing the CPU levels built, e.g. "default,avx2"
                            (default: all three on x86, default elsewhere; default is always built)
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build)
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {value!r}")


def _find_cuda_home() -> str | None:
    import torch.utils.cpp_extension as cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _want_cuda() -> bool:
    import torch

    forced = _env_flag("STABLE_DFL_CUDA")
    if forced is False:
        return False
    has_toolkit = torch.version.cuda is not None and _find_cuda_home() is not None
    if forced and not has_toolkit:
        raise RuntimeError(
            "STABLE_DFL_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, nvcc found: {_find_cuda_home() is not None}"
        )
    return has_toolkit


CPU_LEVELS = ("default", "avx2", "avx512")
# ATen's flags for its own per-level kernels (cmake/Codegen.cmake), and the macros that
# select ATen's Vectorized<T> implementation; F16C for the fp16 conversions of both.
CPU_LEVEL_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}


def _cpu_levels() -> list[str]:
    """The SIMD levels to build CPU kernels for: every x86 level unless narrowed.

    ``default`` is always built, so that every CPU has a kernel whatever the setting.
    """
    if os.environ.get("STABLE_DFL_CPU_ISA"):
        raise ValueError(
            "STABLE_DFL_CPU_ISA is gone: every CPU level is built and the one in use is picked "
            "at run time; STABLE_DFL_CPU_ISAS=default,avx2 narrows the levels built"
        )
    if not _is_x86():
        return ["default"]
    requested = os.environ.get("STABLE_DFL_CPU_ISAS", "").lower().replace(" ", "")
    if not requested:
        return list(CPU_LEVELS)
    levels = requested.split(",")
    unknown = sorted(set(levels) - set(CPU_LEVELS))
    if unknown:
        raise ValueError(
            f"STABLE_DFL_CPU_ISAS lists unknown levels {unknown}; choose from {CPU_LEVELS}"
        )
    return [level for level in CPU_LEVELS if level in levels or level == "default"]


def _cpu_kernel_extension(level: str) -> CppExtension:
    """The kernels of one SIMD level, a library of their own (csrc/cpu/kernel_table.h)."""
    return CppExtension(
        f"stable_dfl._cpu_kernels_{level}",
        sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        extra_compile_args={
            "cxx": ["-O3", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
            + CPU_LEVEL_FLAGS[level]
        },
    )


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _main_extension(with_cuda: bool):
    """stable_dfl._C: schemas, registrations, the CPU level choice and the CUDA kernels, all
    compiled for the baseline ISA so that importing it runs on every CPU."""
    cpu_sources = sorted(
        p for p in glob.glob(os.path.join("csrc", "*.cpp")) if not p.endswith("_cuda.cpp")
    )
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp", "-ldl"]
    if not with_cuda:
        return CppExtension(
            "stable_dfl._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    os.environ.setdefault("CUDA_HOME", _find_cuda_home())
    arch_list = (
        os.environ.get("STABLE_DFL_CUDA_ARCH_LIST")
        or os.environ.get("TORCH_CUDA_ARCH_LIST")
        or DEFAULT_CUDA_ARCH_LIST
    )
    # cpp_extension reads the list from here; unset with no GPU it crashes.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cuda_sources += sorted(glob.glob(os.path.join("csrc", "*_cuda.cpp")))
    # The pip nvidia-* wheels that come with torch carry headers (cusparse.h, ...)
    # that ATen's CUDA headers include but a bare toolkit may lack.
    import torch

    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs = sorted(glob.glob(os.path.join(torch_site, "nvidia", "cu*", "include")))
    include_dirs += sorted(glob.glob(os.path.join(torch_site, "nvidia", "*", "include")))
    return CUDAExtension(
        "stable_dfl._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=[("STABLE_DFL_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )


class BuildStableDFL(BuildExtension):
    """Builds every extension in a persistent folder of its own (incremental rebuilds with
    ninja, and no two levels' objects in one place), then records what was built."""

    def finalize_options(self) -> None:
        super().finalize_options()
        import torch

        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")

    def build_extension(self, ext) -> None:
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp

    def run(self) -> None:
        super().run()
        import torch

        info = (
            '"""What this build of stable_dfl was compiled for (written by setup.py)."""\n\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CPU_ISAS = {tuple(CPU_BUILD_LEVELS)!r}\n"
            f"WITH_CUDA = {WITH_CUDA!r}\n"
        )
        targets = [os.path.join(self.build_lib, "stable_dfl")]
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(os.path.join(ROOT, "stable_dfl"))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(info)


CPU_BUILD_LEVELS = _cpu_levels()
WITH_CUDA = _want_cuda()

setup(
    ext_modules=[_main_extension(WITH_CUDA)]
    + [_cpu_kernel_extension(level) for level in CPU_BUILD_LEVELS],
    cmdclass={"build_ext": BuildStableDFL.with_options(use_ninja=True)},
)
