"""The one place that knows backends: compiled C++/CUDA, Triton and the eager reference.

Importing the package registers every op (:mod:`.dfl`, :mod:`.grad_norm`), so the table
in :mod:`.backends` can hand out any of them.
"""

from .backends import (
    BACKEND_CHOICES,
    BACKEND_TABLE,
    BACKENDS,
    Backend,
    BackendName,
    BackendUnavailableError,
    cpu_block_cache_info,
    empty_cpu_block_cache,
    set_cpu_block_cache_limit,
    unavailable_reason,
)
from .dfl import dfl_rows, resolve_backend
from .grad_norm import grad_norm_and_nonfinite, grad_sumsq_nonfinite
from .reference import DEFAULT_EPS, DEFAULT_MAX_LOSS, dfl_reference

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BACKEND_TABLE",
    "DEFAULT_EPS",
    "DEFAULT_MAX_LOSS",
    "Backend",
    "BackendName",
    "BackendUnavailableError",
    "cpu_block_cache_info",
    "dfl_reference",
    "dfl_rows",
    "empty_cpu_block_cache",
    "grad_norm_and_nonfinite",
    "grad_sumsq_nonfinite",
    "resolve_backend",
    "set_cpu_block_cache_limit",
    "unavailable_reason",
]
