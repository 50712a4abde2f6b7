"""The one table of backends: which ops each runs, whether it runs here and, if not, why.

Dispatch (:mod:`.dfl`, :mod:`.grad_norm`), the loss's argument check, ``info``, ``doctor``
and the tests all read it. A backend runs an op family through a registered custom op
(``torch.ops.stable_dfl.<name>``), except the reference, which is eager PyTorch code.
"""

from __future__ import annotations

import functools
import importlib.util
import numbers
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import _library

#: The op families every backend implements.
DFL_FORWARD = "dfl_forward"
GRAD_SUMSQ = "grad_sumsq_nonfinite"
UNSCALE_GRAD_SUMSQ = "unscale_grad_sumsq_nonfinite_"
OP_FAMILIES = (DFL_FORWARD, GRAD_SUMSQ, UNSCALE_GRAD_SUMSQ)

#: The SIMD levels of the compiled CPU kernels, lowest first (csrc/cpu_kernels.cpp).
CPU_LEVELS = ("default", "avx2", "avx512")


@dataclass(frozen=True)
class Backend:
    name: str
    runs: str
    """What computes, in words."""
    op_names: dict[str, str] = field(default_factory=dict)
    """Op family -> name of the custom op in ``torch.ops.stable_dfl``; empty for eager code."""

    def op(self, family: str) -> torch._ops.OpOverloadPacket:
        """The custom op that runs ``family`` on this backend."""
        if family not in self.op_names:
            raise ValueError(f"backend {self.name!r} runs {family} as eager code, not as an op")
        return getattr(torch.ops.stable_dfl, self.op_names[family])


_COMPILED_OPS = {family: family for family in OP_FAMILIES}
BACKEND_TABLE: dict[str, Backend] = {
    "cpu": Backend("cpu", "compiled C++ (stable_dfl._C)", _COMPILED_OPS),
    "cuda": Backend("cuda", "compiled CUDA C++ (stable_dfl._C)", _COMPILED_OPS),
    "triton": Backend(
        "triton",
        "Triton kernels",
        {
            DFL_FORWARD: "dfl_forward_triton",
            GRAD_SUMSQ: "grad_sumsq_nonfinite_triton",
            UNSCALE_GRAD_SUMSQ: "unscale_grad_sumsq_nonfinite_triton_",
        },
    ),
    "reference": Backend("reference", "eager PyTorch (the specification)"),
}
BACKENDS = tuple(BACKEND_TABLE)
#: What a ``backend=`` argument accepts: a backend name, or 'auto' (see AUTO_ORDER).
BACKEND_CHOICES = ("auto", *BACKENDS)
BackendName = Literal["auto", "cpu", "cuda", "triton", "reference"]
#: What 'auto' tries, in order, per device type (anything else runs the reference).
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def op(backend: str, family: str = DFL_FORWARD) -> torch._ops.OpOverloadPacket:
    """The custom op that runs op ``family`` on ``backend`` (not 'reference': eager code)."""
    return BACKEND_TABLE[backend].op(family)


def extension_error() -> str | None:
    """Why the compiled extension stable_dfl._C is not loaded; None when it is."""
    return _library.EXTENSION_ERROR


def compiled_available(device_type: str, family: str = DFL_FORWARD) -> bool:
    """True when the loaded stable_dfl._C has a kernel of ``family`` for ``device_type``
    ('cpu' or 'cuda') tensors (the CUDA kernels may be built in without a GPU to run them)."""
    return device_type in ("cpu", "cuda") and _library.has_kernel(family, device_type.upper())


def cpu_kernel_isa() -> str | None:
    """The SIMD level of the compiled CPU kernels in use ('default', 'avx2' or 'avx512'), as
    the loaded kernel library reports it; None without the extension.

    It is ATen's CPU capability (``ATEN_CPU_CAPABILITY=default|avx2|avx512`` lowers it),
    lowered further to what the CPU runs and to the levels installed.
    """
    return _library.cpu_kernel_isa()


def cpu_kernel_isas() -> tuple[str, ...]:
    """The SIMD levels whose CPU kernels are installed, lowest first; () without the extension."""
    return _library.cpu_kernel_isas()


def runnable_cpu_levels() -> tuple[str, ...]:
    """The levels up to the one in use, lowest first: those ``ATEN_CPU_CAPABILITY`` can force
    in this process's environment; () without the extension."""
    isa = cpu_kernel_isa()
    return () if isa is None else CPU_LEVELS[: CPU_LEVELS.index(isa) + 1]


def cpu_block_cache_info() -> dict[str, int] | None:
    """The compiled CPU op's cache of large buffers: ``limit_bytes``, ``cached_bytes``,
    ``cached_blocks``, and the counts of requests served from a kept block (``reused``) and
    from fresh memory (``allocated``). None without the compiled extension.

    A training step's DFL gradient on the CPU is tens of MB, freed when the step ends and asked
    for again, same size, by the next step; malloc maps memory that large fresh on every request
    and unmaps it on free, so each step would pay a page fault and the zeroing of every page.
    The CPU op therefore takes buffers of 4 MiB or more from the blocks earlier ones released,
    as torch's caching allocator does on CUDA: a block serves a request of up to a quarter less
    than its size, and at most ``limit_bytes`` are kept while no tensor uses them (512 MiB,
    unless ``STABLE_DFL_CPU_CACHE_MB`` says otherwise when the cache is first used; 0 keeps
    nothing).
    """
    return _library.cpu_block_cache_info()


def empty_cpu_block_cache() -> None:
    """Frees every block the CPU op keeps for reuse (buffers in use stay, and are kept again on
    release while the limit allows). Does nothing without the compiled extension."""
    _library.empty_cpu_block_cache()


def set_cpu_block_cache_limit(limit_bytes: int) -> None:
    """Keeps at most ``limit_bytes`` of released blocks from now on (0: none) and frees the
    oldest kept blocks beyond it. Raises BackendUnavailableError without the compiled
    extension."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, numbers.Integral):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    if _library.EXTENSION_ERROR is not None:
        raise BackendUnavailableError(_extension_not_loaded())
    _library.set_cpu_block_cache_limit(int(limit_bytes))


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


def _extension_not_loaded() -> str:
    return f"the compiled extension stable_dfl._C is not loaded ({_library.EXTENSION_ERROR})"


def _compiled_reason(backend: str, device: torch.device, family: str) -> str | None:
    if device.type != backend:
        return f"backend {backend!r} runs on {backend.upper()} tensors, got tensors on {device}"
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available to this process"
    if _library.EXTENSION_ERROR is not None:
        return _extension_not_loaded()
    if compiled_available(backend, family):
        return None
    if backend == "cuda":
        return (
            "stable_dfl._C was built without its CUDA kernels (reinstall with a CUDA build "
            "of torch and nvcc on PATH, or STABLE_DFL_CUDA=1)"
        )
    return f"the loaded stable_dfl._C has no CPU kernel of {family} (rebuild it)"


def _triton_reason(device: torch.device) -> str | None:
    if triton_import_error() is not None:
        return triton_import_error()
    if device.type == "cpu" and not triton_interpreter_enabled():
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to interpret them on CPU)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels need CUDA tensors, got tensors on {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available to this process"
    return None


def unavailable_reason(backend: str, device: torch.device, family: str = DFL_FORWARD) -> str | None:
    """None when ``backend`` can run op ``family`` on tensors of ``device``, else why not."""
    if backend not in BACKEND_TABLE:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if family not in OP_FAMILIES:
        raise ValueError(f"op family must be one of {OP_FAMILIES}, got {family!r}")
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(device)
    return _compiled_reason(backend, device, family)


def resolve(backend: str, device: torch.device, family: str = DFL_FORWARD) -> str:
    """The backend that runs op ``family`` for ``backend`` ('auto' or a name) on ``device``.

    Raises BackendUnavailableError, saying why, when an explicit backend cannot run.
    """
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device, family) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device, family)
    if reason is not None:
        raise BackendUnavailableError(f"stable_dfl backend {backend!r} unavailable: {reason}")
    return backend
