"""stable_dfl: fused, numerically stable Distribution Focal Loss for PyTorch."""

from .loss import StableDFLLoss, stable_dfl_loss
from .ops import (
    DEFAULT_EPS,
    DEFAULT_MAX_LOSS,
    BackendUnavailableError,
    dfl_reference,
    resolve_backend,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MAX_LOSS",
    "BackendUnavailableError",
    "StableDFLLoss",
    "__version__",
    "dfl_reference",
    "resolve_backend",
    "stable_dfl_loss",
]
