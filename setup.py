"""Builds stable_dfl._C from csrc/.

The C++ CPU kernels always build. The CUDA kernels (csrc/*.cu and csrc/*_cuda.cpp) build
when the installed torch has CUDA and nvcc is found.

Environment:
  STABLE_DFL_CUDA=1|0       force or skip the CUDA kernels (default: auto)
  STABLE_DFL_CUDA_ARCH_LIST architectures for nvcc, e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST,
                            else a list from Turing to Blackwell)
  STABLE_DFL_CPU_ISA        avx512 | avx2 | default: the SIMD level of the CPU kernels
                            (default: the best this build machine supports)
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build)
"""

import glob
import os
import platform
import shutil

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


def _cpu_isa() -> str:
    requested = os.environ.get("STABLE_DFL_CPU_ISA", "").lower()
    if requested:
        if requested not in ("avx512", "avx2", "default"):
            raise ValueError(
                f"STABLE_DFL_CPU_ISA must be avx512, avx2 or default, got {requested!r}"
            )
        return requested
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "avx512"
    if {"avx2", "fma"} <= set(flags):
        return "avx2"
    return "default"


# ATen's Vectorized<T> picks its implementation from these macros and the compiler's ISA flags.
ISA_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mavx2",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _extension():
    cpu_sources = sorted(
        p for p in glob.glob(os.path.join("csrc", "*.cpp")) if not p.endswith("_cuda.cpp")
    )
    cxx_flags = ["-O3", "-fopenmp", *ISA_FLAGS[_cpu_isa()]]
    link_flags = ["-fopenmp"]
    if not _want_cuda():
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


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
