"""Training: the AMP trainer, checkpoints and evaluation."""

from .checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, parse_config
from .distributed import DistContext, init_distributed
from .evaluate import evaluate, mean_average_precision
from .precision import Precision, default_cpu_precision, resolve_precision
from .trainer import Trainer, TrainingDivergedError

__all__ = [
    "CheckpointError",
    "DistContext",
    "NonFiniteCheckpointError",
    "Precision",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "default_cpu_precision",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "mean_average_precision",
    "parse_config",
    "resolve_precision",
    "save_checkpoint",
]
