"""The one place that knows backends: compiled C++/CUDA, Triton and the eager reference."""

from ._library import BACKENDS, BackendUnavailableError, unavailable_reason
from .dfl import dfl_rows, resolve_backend
from .reference import DEFAULT_EPS, DEFAULT_MAX_LOSS, dfl_reference

__all__ = [
    "BACKENDS",
    "DEFAULT_EPS",
    "DEFAULT_MAX_LOSS",
    "BackendUnavailableError",
    "dfl_reference",
    "dfl_rows",
    "resolve_backend",
    "unavailable_reason",
]
