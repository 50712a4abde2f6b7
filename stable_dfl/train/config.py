"""Training configuration: one dataclass, from which the command line is generated."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38


def _option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Defaults are the stage-2 recipe (docs/GRADIENT_FIX_QUICKSTART.md) on the built-in data,
    sized to finish in a few minutes on a 2-core CPU."""

    # Optimisation (stage-2 values).
    lr: float = _option(3e-5, "peak AdamW learning rate")
    weight_decay: float = _option(0.005, "AdamW weight decay (conv/linear weights only)")
    dfl_weight: float = _option(0.5, "weight of the DFL loss in the total")
    gradient_clip_norm: float = _option(0.5, "clip the total gradient norm to this")
    cls_weight: float = _option(1.0, "weight of the classification loss")
    iou_weight: float = _option(2.5, "weight of the CIoU box loss")
    epochs: int = _option(10, "training epochs")
    batch_size: int = _option(8, "images per batch and process")
    warmup_steps: int = _option(100, "linear LR warmup, in optimizer steps")
    min_lr_ratio: float = _option(0.1, "final LR of the cosine decay, as a fraction of --lr")
    ema_decay: float = _option(0.9999, "EMA decay of the validation weights")
    amp: str = _option(
        "auto",
        "mixed precision: auto (fp16 + GradScaler on CUDA; on a CPU bf16 where it computes "
        "bf16 natively, else full precision, as emulated bf16 is up to ~50x slower; the "
        "log's first line says which and why), off, or bf16 / fp16 to force one",
        choices=("auto", "off", "bf16", "fp16"),
    )
    seed: int = _option(0, "seed of weights, data and sampling")
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
    train_images: int = _option(2048, "synthetic training images")
    val_images: int = _option(128, "synthetic validation images")
    image_size: int = _option(64, "square input size in pixels (a multiple of 32)")
    workers: int = _option(0, "DataLoader worker processes")
    # Model.
    n_bins: int = _option(16, "DFL bins per box side")
    width: int = _option(16, "backbone base width (channels of the first stage)")
    fpn_channels: int = _option(128, "FPN and head channels")
    embed_dim: int = _option(32, "prototype head embedding size")
    # Run.
    device: str = _option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    save_dir: str = _option("checkpoints/stage2", "folder of checkpoints and logs")
    log_interval: int = _option(10, "batches between 'Batch N:' log lines")
    debug_interval: int = _option(50, "batches between 'Loss components' / 'Gradient Norms' blocks")
    save_period: int = _option(0, "also keep epoch<N>.pt every this many epochs (0: never)")
    max_consecutive_skips: int = _option(
        20,
        "stop with an error (exit code 3) once this many optimizer steps in a row were skipped "
        "for NaN/Inf gradients; the last checkpoint is kept (0: never stop)",
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
        if option.type in ("bool", bool):
            parser.add_argument(f"--{option.name}", action="store_true", **kwargs)
            continue
        value_type = {"float": float, "int": int}.get(str(option.type), str)
        parser.add_argument(f"--{option.name}", type=value_type, default=option.default, **kwargs)
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    args = build_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    if config.image_size % 32:
        build_parser().error(f"--image_size must be a multiple of 32, got {config.image_size}")
    # AdamW multiplies float32 weights by it: NaN, Inf or beyond float32 is never meant.
    if not 0 < config.lr <= FLOAT32_MAX:
        build_parser().error(
            f"--lr must be positive and at most {FLOAT32_MAX:.3g}, got {config.lr}"
        )
    return config
