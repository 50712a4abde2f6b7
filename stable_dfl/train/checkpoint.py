"""Checkpoints: atomic saves, safe loads (``weights_only=True``), refusal of non-finite weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint holds NaN or Inf weights: training cannot continue from it."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes ``state`` to a temporary file beside ``path``, then renames it over ``path``,
    so a crash mid-save never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an Inf, else None."""
    for name, value in state_dict.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not torch.isfinite(value).all()
        ):
            return name
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint on CPU with ``weights_only=True``.

    Raises NonFiniteCheckpointError naming the first bad tensor when the model (or its
    EMA) weights are not all finite: such a run has diverged and cannot be resumed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = {"model": model_state(state)}
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        weights["ema"] = state["ema"]["module"]
    for key, state_dict in weights.items():
        bad = first_non_finite(state_dict)
        if bad is not None:
            raise NonFiniteCheckpointError(
                f"{path}: {key} weights are not finite (first bad tensor: {bad!r}); the run it "
                "comes from has diverged and cannot be continued. Start fresh (drop --resume / --init_from)."
            )
    return state


def model_state(state: dict) -> dict[str, torch.Tensor]:
    """The model weights of a trainer checkpoint, or ``state`` itself if it is a bare state_dict."""
    return state["model"] if isinstance(state.get("model"), dict) else state
