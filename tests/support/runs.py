"""The one tiny training run of the tests (its config and command line), its records, and
exact comparisons of training state."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from stable_dfl.train import DistContext, TrainConfig, Trainer

CPU = DistContext(0, 1, torch.device("cpu"))

#: A run of a few tenths of a second per epoch on one CPU thread: 2 batches per epoch.
TINY_RUN: dict[str, Any] = dict(
    train_images=8,
    val_images=4,
    image_size=32,
    batch_size=4,
    epochs=1,
    width=4,
    fpn_channels=16,
    embed_dim=8,
    warmup_steps=1,
    log_interval=1,
    debug_interval=1000,
    device="cpu",
    amp="off",
)


def tiny_config(save_dir: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(**{**TINY_RUN, "save_dir": str(save_dir), **overrides})


def cli_args(save_dir: Path, **overrides: Any) -> list[str]:
    """The command line of ``tiny_config(save_dir, **overrides)``."""
    options = {**TINY_RUN, "save_dir": str(save_dir), **overrides}
    args = []
    for name, value in options.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None and value is not False:
            args += [f"--{name}", str(value)]
    return args


def records(save_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (Path(save_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def training_state(trainer: Trainer) -> dict[str, Any]:
    """A deep copy of what a skipped step must not change (the LR schedule moves on)."""
    return copy.deepcopy(
        {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict()["state"],
            "ema": trainer.ema.state_dict(),
        }
    )


def assert_bit_identical(a: Any, b: Any, where: str = "") -> None:
    """Same structure, same values, same bits (NaN payloads and signed zeros included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bytes(a), _bytes(b)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bit_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bit_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)
