"""stable_dfl: fused, numerically stable Distribution Focal Loss for PyTorch."""

from .guard import GradGuard, GradGuardResult
from .loss import StableDFLLoss, stable_dfl_loss
from .ops import (
    DEFAULT_EPS,
    DEFAULT_MAX_LOSS,
    BackendUnavailableError,
    cpu_block_cache_info,
    dfl_reference,
    empty_cpu_block_cache,
    resolve_backend,
    set_cpu_block_cache_limit,
)
from .ops.grad_norm import grad_norm_and_nonfinite

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MAX_LOSS",
    "BackendUnavailableError",
    "GradGuard",
    "GradGuardResult",
    "StableDFLLoss",
    "__version__",
    "cpu_block_cache_info",
    "dfl_reference",
    "empty_cpu_block_cache",
    "grad_norm_and_nonfinite",
    "resolve_backend",
    "set_cpu_block_cache_limit",
    "stable_dfl_loss",
]
