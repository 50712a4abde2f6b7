"""Loads the compiled extension ``stable_dfl._C`` and answers what it holds.

Importing this module never fails: when the extension is missing or cannot be loaded, one
warning says why and which backend is used instead. Everything else reads the answers
through :mod:`.backends`.
"""

from __future__ import annotations

import functools
import warnings

import torch


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


# The extension registers its kernels when it loads, once: the answer is fixed for the process
# (and asking the dispatcher costs more than a small DFL call's arithmetic).
@functools.cache
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the loaded extension registered a ``dispatch_key`` kernel of ``stable_dfl::op``."""
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"stable_dfl::{op}", dispatch_key
    )


def cpu_kernel_isa() -> str | None:
    """The level the loaded CPU kernel library reports; None without the extension."""
    if EXTENSION_ERROR is not None:
        return None
    from stable_dfl import _C

    return _C.cpu_kernel_isa()


def cpu_kernel_isas() -> tuple[str, ...]:
    """The levels whose CPU kernel libraries are installed; () without the extension."""
    if EXTENSION_ERROR is not None:
        return ()
    from stable_dfl import _C

    return _C.cpu_kernel_isas()


def cpu_block_cache_info() -> dict[str, int] | None:
    """The limit, contents and counters of the CPU op's block cache; None without the extension."""
    if EXTENSION_ERROR is not None:
        return None
    from stable_dfl import _C

    return _C.cpu_block_cache_info()


def empty_cpu_block_cache() -> None:
    """Frees the blocks the CPU op keeps for reuse (nothing to do without the extension)."""
    if EXTENSION_ERROR is None:
        from stable_dfl import _C

        _C.empty_cpu_block_cache()


def set_cpu_block_cache_limit(limit_bytes: int) -> None:
    """Sets the most bytes the CPU op keeps for reuse; needs the extension."""
    from stable_dfl import _C

    _C.set_cpu_block_cache_limit(limit_bytes)


if EXTENSION_ERROR is not None:
    warnings.warn(
        "stable_dfl: the compiled extension stable_dfl._C could not be loaded "
        f"({EXTENSION_ERROR}); falling back to the Triton kernels on CUDA tensors where Triton "
        "is available and to the eager PyTorch reference otherwise. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
