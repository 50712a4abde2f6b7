"""stable_dfl: fused, numerically stable Distribution Focal Loss for PyTorch."""

from .loss import StableDFLLoss, stable_dfl_loss
from .ops import BackendUnavailableError, dfl_reference, resolve_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "StableDFLLoss",
    "__version__",
    "dfl_reference",
    "resolve_backend",
    "stable_dfl_loss",
]
