"""What the trainer trains with, built from its config: the data loaders, and the
optimizer with its LR schedule, loss scaler and step (the GradGuard or the plain clip)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data import PadToFixedBoxes, SyntheticShapes, YoloDataset, check_dataset
from ..guard import GradGuard
from .config import ConfigError, TrainConfig
from .distributed import DistContext
from .plain_step import PlainClipStep
from .schedule import WarmupCosine
from .step import OptimizerStepper


class EpochSampler(DistributedSampler):
    """This rank's shard of the training set, reshuffled by ``set_epoch``, which can also
    start the epoch after its first batches (a run resumed in the middle of an epoch gets
    the batches it had not trained yet, in the order it would have had)."""

    def __init__(self, dataset: Dataset, context: DistContext, seed: int, batch_size: int) -> None:
        super().__init__(
            dataset, context.world_size, context.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.start_batch * self.batch_size, 0)


class TrainingData(NamedTuple):
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    class_names: tuple[str, ...]
    summary: list[str]
    """What the dataset check found (empty for the built-in data)."""


class Optimization(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stepper: OptimizerStepper


def build_datasets(
    config: TrainConfig, progress: Callable[[str], None] | None = None
) -> tuple[Dataset, Dataset, tuple[str, ...], list[str]]:
    """The training and validation sets, their class names and the dataset check's summary.
    ``--data`` is checked first (every image decoded, every label parsed; cached), which
    raises DatasetError naming the broken files."""
    if config.data is None:
        train_set = SyntheticShapes(config.train_images, config.image_size, "train", config.seed)
        val_set = SyntheticShapes(config.val_images, config.image_size, "val", config.seed)
        return train_set, val_set, train_set.class_names, []
    check = check_dataset(
        config.data,
        (config.train_split, config.val_split),
        config.names.split(",") if config.names else None,
        skip_bad=config.skip_bad_files,
        progress=progress,
    )
    train_set, val_set = (
        YoloDataset.from_check(check.splits[split], check.class_names, config.image_size)
        for split in (config.train_split, config.val_split)
    )
    return train_set, val_set, check.class_names, check.summary_lines()


def build_data(
    config: TrainConfig, context: DistContext, progress: Callable[[str], None] | None = None
) -> TrainingData:
    """Raises ConfigError when the training set is smaller than one batch per process."""
    train_set, val_set, class_names, summary = build_datasets(config, progress)
    max_objects = max(train_set.max_objects, val_set.max_objects)
    sampler = EpochSampler(train_set, context, config.seed, config.batch_size)
    train_loader = DataLoader(
        train_set,
        config.batch_size,
        sampler=sampler,
        collate_fn=PadToFixedBoxes(max_objects),
        num_workers=config.workers,
        drop_last=True,
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"{len(train_set)} training images are fewer than one batch of {config.batch_size} "
            f"per process ({context.world_size} processes): lower --batch_size"
        )
    val_loader = DataLoader(val_set, config.batch_size, collate_fn=PadToFixedBoxes(max_objects))
    return TrainingData(sampler, train_loader, val_loader, class_names, summary)


def build_optimization(
    model: nn.Module,
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    total_steps: int,
) -> Optimization:
    """AdamW, warmup then cosine decay over ``total_steps``, a GradScaler enabled for fp16
    only, and the step ``--nan_guard`` asks for, clipping to ``--gradient_clip_norm``."""
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(total_steps, config.warmup_steps, config.min_lr_ratio)
    )
    # Loss scaling is for fp16 only: bf16 has fp32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stepper: OptimizerStepper = (
        # Every offender is reported: the log names the first ones and counts the rest.
        GradGuard(
            model,
            max_norm=config.gradient_clip_norm,
            max_offenders=sum(1 for _ in model.parameters()),
        )
        if config.nan_guard == "on"
        else PlainClipStep(model, max_norm=config.gradient_clip_norm)
    )
    return Optimization(optimizer, scheduler, scaler, stepper)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; not on norms, biases, prototypes or scales."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        is_weight_matrix = parameter.ndim > 1 and not name.endswith("prototypes")
        (decay if is_weight_matrix else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
