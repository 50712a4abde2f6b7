"""Loads the compiled extension and says which backends this process can run.

Importing this module never fails: when ``stable_dfl._C`` is missing or cannot be
loaded, one warning says why and which backend is used instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")
#: The SIMD levels of the compiled CPU kernels, lowest first (csrc/cpu_kernels.cpp).
CPU_LEVELS = ("default", "avx2", "avx512")


def _build_mismatch() -> str | None:
    """Why the installed stable_dfl._C must not be loaded into this torch, or None.

    setup.py records the torch it compiled against; an extension built for another torch
    fails to load with an undefined symbol at best, so it is not even tried.
    """
    try:
        from stable_dfl import _build_info
    except ImportError:  # not built (a source checkout), or built before the record existed
        return None
    if _build_info.TORCH_VERSION != torch.__version__:
        return (
            f"stable_dfl._C was built for torch {_build_info.TORCH_VERSION}, this is torch "
            f"{torch.__version__}: reinstall stable_dfl"
        )
    return None


def _load_extension() -> str | None:
    """Imports stable_dfl._C and its CPU kernels; returns None on success, else why not."""
    mismatch = _build_mismatch()
    if mismatch is not None:
        return mismatch
    try:
        from stable_dfl import _C  # registers the ops
    except ImportError as error:  # missing build, or an ABI mismatch with this torch
        if "undefined symbol" in str(error):
            return (
                f"stable_dfl._C does not match torch {torch.__version__} "
                f"({type(error).__name__}: {error}): reinstall stable_dfl"
            )
        return f"{type(error).__name__}: {error}"
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    try:
        _C.cpu_kernel_isa()  # loads the CPU kernel library of the level in use
    except RuntimeError as error:
        return str(error)
    return None


EXTENSION_ERROR = _load_extension()


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"stable_dfl::{op}", dispatch_key
    )


def has_kernel(op: str, device: torch.device) -> bool:
    """True when the loaded extension has a kernel of ``op`` for tensors on ``device``."""
    return device.type in ("cpu", "cuda") and _has_kernel(op, device.type.upper())


def cpu_kernel_isa() -> str | None:
    """The SIMD level of the compiled CPU kernels in use ('default', 'avx2' or 'avx512'), as
    the loaded kernel library reports it; None without the extension.

    It is ATen's CPU capability (``ATEN_CPU_CAPABILITY=default|avx2|avx512`` lowers it),
    lowered further to what the CPU runs and to the levels installed.
    """
    if EXTENSION_ERROR is not None:
        return None
    from stable_dfl import _C

    return _C.cpu_kernel_isa()


def cpu_kernel_isas() -> tuple[str, ...]:
    """The SIMD levels whose CPU kernels are installed, lowest first; () without the extension."""
    if EXTENSION_ERROR is not None:
        return ()
    from stable_dfl import _C

    return _C.cpu_kernel_isas()


def runnable_cpu_levels() -> tuple[str, ...]:
    """The levels up to the one in use, lowest first: those ``ATEN_CPU_CAPABILITY`` can force
    in this process's environment; () without the extension."""
    isa = cpu_kernel_isa()
    return () if isa is None else CPU_LEVELS[: CPU_LEVELS.index(isa) + 1]


def compiled_cpu_available(op: str = "dfl_forward") -> bool:
    """True when the compiled C++ CPU kernel of ``op`` is loaded."""
    return _has_kernel(op, "CPU")


def compiled_cuda_available(op: str = "dfl_forward") -> bool:
    """True when the compiled CUDA kernel of ``op`` is built into the loaded extension."""
    return _has_kernel(op, "CUDA")


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return f"importing triton failed: {type(error).__name__}: {error}"
    return None


def triton_interpreter_enabled() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device, op: str = "dfl_forward") -> str | None:
    """None when ``backend`` can run ``op`` on tensors of ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        if EXTENSION_ERROR is not None:
            return f"the compiled extension stable_dfl._C is not loaded ({EXTENSION_ERROR})"
        if not compiled_cpu_available(op):
            return f"the loaded stable_dfl._C has no CPU kernel of {op} (rebuild it)"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to this process"
        if EXTENSION_ERROR is not None:
            return f"the compiled extension stable_dfl._C is not loaded ({EXTENSION_ERROR})"
        if not compiled_cuda_available(op):
            return (
                "stable_dfl._C was built without its CUDA kernels (reinstall with a CUDA build "
                "of torch and nvcc on PATH, or STABLE_DFL_CUDA=1)"
            )
        return None
    if backend == "triton":
        if triton_import_error() is not None:
            return triton_import_error()
        if device.type == "cpu" and not triton_interpreter_enabled():
            return (
                "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to interpret them on CPU)"
            )
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, got tensors on {device}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is available to this process"
        return None
    raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


#: What 'auto' tries, in order, per device type (anything else runs the reference).
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """The backend that runs ``op`` for ``backend`` ('auto' or a name) on tensors of ``device``.

    Raises BackendUnavailableError, saying why, when an explicit backend cannot run.
    """
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device, op) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device, op)
    if reason is not None:
        raise BackendUnavailableError(f"stable_dfl backend {backend!r} unavailable: {reason}")
    return backend


if EXTENSION_ERROR is not None:
    warnings.warn(
        "stable_dfl: the compiled extension stable_dfl._C could not be loaded "
        f"({EXTENSION_ERROR}); falling back to the Triton kernels on CUDA tensors where Triton "
        "is available and to the eager PyTorch reference otherwise. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
