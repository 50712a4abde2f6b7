"""stable_dfl: fused, numerically stable Distribution Focal Loss for PyTorch."""

from .guard import GradGuard, GradGuardResult
from .loss import StableDFLLoss, stable_dfl_loss
from .ops import (
    DEFAULT_EPS,
    DEFAULT_MAX_LOSS,
    BackendUnavailableError,
    dfl_reference,
    resolve_backend,
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
    "dfl_reference",
    "grad_norm_and_nonfinite",
    "resolve_backend",
    "stable_dfl_loss",
]
