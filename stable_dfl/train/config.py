"""Training configuration: one dataclass, from which the command line is generated.

Every number has its range next to its default; a config outside it (from the command line
or built in code) is refused with a :class:`ConfigError` naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..ops.reference import MAX_BINS

FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """An option out of its range, a combination of options that contradict each other, or
    options that do not fit the data (a batch larger than the training set)."""


class Range(NamedTuple):
    """Allowed values of a number: ``low``/``high`` bounds (None: unbounded), each closed
    unless ``low_open``/``high_open``; floats must be finite unless ``high`` is infinite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


POSITIVE = Range(0, FLOAT32_MAX, low_open=True)
NON_NEGATIVE = Range(0, FLOAT32_MAX)
AT_LEAST_ONE = Range(1)
COUNT = Range(0)


def _option(default: Any, help: str, valid: Range | None = None, **argparse_kwargs: Any) -> Any:
    metadata = {"help": help, **argparse_kwargs}
    if valid is not None:
        metadata["valid"] = valid
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Defaults are the stage-2 recipe (docs/GRADIENT_FIX_QUICKSTART.md) on the built-in data,
    sized to finish in a few minutes on a 2-core CPU."""

    # Optimisation (stage-2 values).
    lr: float = _option(3e-5, "peak AdamW learning rate", POSITIVE)
    weight_decay: float = _option(
        0.005, "AdamW weight decay (conv/linear weights only)", NON_NEGATIVE
    )
    dfl_weight: float = _option(0.5, "weight of the DFL loss in the total", NON_NEGATIVE)
    gradient_clip_norm: float = _option(0.5, "clip the total gradient norm to this", POSITIVE)
    cls_weight: float = _option(1.0, "weight of the classification loss", NON_NEGATIVE)
    iou_weight: float = _option(2.5, "weight of the CIoU box loss", NON_NEGATIVE)
    epochs: int = _option(10, "training epochs", AT_LEAST_ONE)
    batch_size: int = _option(8, "images per batch and process", AT_LEAST_ONE)
    warmup_steps: int = _option(100, "linear LR warmup, in optimizer steps", COUNT)
    min_lr_ratio: float = _option(
        0.1, "final LR of the cosine decay, as a fraction of --lr", Range(0, 1)
    )
    ema_decay: float = _option(
        0.9999, "EMA decay of the validation weights", Range(0, 1, high_open=True)
    )
    amp: str = _option(
        "auto",
        "mixed precision: auto (fp16 + GradScaler on CUDA; on a CPU bf16 where it computes "
        "bf16 natively, else full precision, as emulated bf16 is up to ~50x slower; the "
        "log's first line says which and why), off, or bf16 / fp16 to force one",
        choices=("auto", "off", "bf16", "fp16"),
    )
    seed: int = _option(0, "seed of weights, data and sampling", COUNT)
    # Switches that turn one stage-2 fix off, for before/after experiments.
    dfl_impl: str = _option(
        "stable",
        "DFL: stable (fused, probability floor, loss cap) or naive (plain log(softmax) in the "
        "autocast dtype, no floor, no cap)",
        choices=("stable", "naive"),
    )
    head_init: str = _option(
        "small",
        "head init: small (_initialize_weights) or default (PyTorch's layer defaults)",
        choices=("small", "default"),
    )
    nan_guard: str = _option(
        "on",
        "on: GradGuard (fused NaN/Inf check; a bad step is skipped and its parameters named); "
        "off: plain unscale_ + clip_grad_norm_ + scaler.step, which takes a NaN/Inf step "
        "unless an fp16 GradScaler skips it",
        choices=("on", "off"),
    )
    # Data.
    data: str | None = _option(
        None, "YOLO-format dataset root (default: the built-in synthetic shapes)"
    )
    names: str | None = _option(
        None, "comma-separated class names for --data (else classes.txt/data.yaml)"
    )
    train_split: str = _option("train", "split folder of --data used for training")
    val_split: str = _option("val", "split folder of --data used for validation")
    train_images: int = _option(2048, "synthetic training images", AT_LEAST_ONE)
    val_images: int = _option(128, "synthetic validation images", AT_LEAST_ONE)
    skip_bad_files: bool = _option(
        False,
        "train without the images and label lines that --data's check finds broken (each "
        "is listed and counted) instead of refusing the dataset",
    )
    image_size: int = _option(64, "square input size in pixels (a multiple of 32)", Range(32))
    workers: int = _option(0, "DataLoader worker processes", COUNT)
    # Model.
    n_bins: int = _option(16, "DFL bins per box side", Range(2, MAX_BINS))
    width: int = _option(16, "backbone base width (channels of the first stage)", AT_LEAST_ONE)
    fpn_channels: int = _option(128, "FPN and head channels", AT_LEAST_ONE)
    embed_dim: int = _option(32, "prototype head embedding size", AT_LEAST_ONE)
    # Run.
    device: str = _option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    save_dir: str = _option("checkpoints/stage2", "folder of checkpoints and logs")
    log_interval: int = _option(10, "batches between 'Batch N:' log lines", AT_LEAST_ONE)
    debug_interval: int = _option(
        50, "batches between 'Loss components' / 'Gradient Norms' blocks", AT_LEAST_ONE
    )
    save_period: int = _option(0, "also keep epoch<N>.pt every this many epochs (0: never)", COUNT)
    max_consecutive_skips: int = _option(
        20,
        "stop with an error (exit code 3) once this many optimizer steps in a row were skipped "
        "for NaN/Inf gradients; the last checkpoint is kept (0: never stop)",
        COUNT,
    )
    forensics_steps: int = _option(
        3,
        "explain this many skipped steps (the first ones) by replaying each once with hooks: "
        "first NaN/Inf module, loss or gradient and the images that cause it, in "
        "<save_dir>/forensics/step_<k>.json (0: never)",
        COUNT,
    )
    resume: str | None = _option(
        None,
        "continue a run from a checkpoint (default with no path: <save_dir>/last.pt)",
        nargs="?",
        const="",
    )
    init_from: str | None = _option(
        None, "start from a stage-1 checkpoint's weights (fresh optimizer)"
    )
    tensorboard: bool = _option(False, "also log to TensorBoard (<save_dir>/tensorboard)")
    wandb: bool = _option(False, "also log to Weights & Biases (offline without WANDB_API_KEY)")

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            valid = option.metadata.get("valid")
            value = getattr(self, option.name)
            if valid is not None and not valid.contains(value):
                raise ConfigError(f"--{option.name} must be {valid.describe()}, got {value}")
        if self.image_size % 32:
            raise ConfigError(f"--image_size must be a multiple of 32, got {self.image_size}")
        if self.resume is not None and self.init_from:
            raise ConfigError(
                "--resume continues a run with its own weights and --init_from starts a new one "
                "from other weights: give one of them"
            )
        if self.data is None:
            for name in ("names", "skip_bad_files"):
                if getattr(self, name):
                    raise ConfigError(f"--{name} applies to --data only")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser(prog: str = "python -m stable_dfl train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train the dual-head detector (AMP, gradient guard, EMA, checkpoints, DDP under torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for option in dataclasses.fields(TrainConfig):
        kwargs = dict(option.metadata)
        valid = kwargs.pop("valid", None)
        if valid is not None:
            kwargs["help"] += f" ({valid.describe()})"
        if option.type in ("bool", bool):
            parser.add_argument(f"--{option.name}", action="store_true", **kwargs)
            continue
        value_type = {"float": float, "int": int}.get(str(option.type), str)
        parser.add_argument(f"--{option.name}", type=value_type, default=option.default, **kwargs)
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except ConfigError as error:
        parser.error(str(error))
