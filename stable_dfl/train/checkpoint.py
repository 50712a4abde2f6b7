"""Checkpoints: atomic saves, safe loads (``weights_only=True``), refusal of non-finite weights."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, not a checkpoint, unsafe, or for another model."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint holds NaN or Inf weights: training cannot continue from it."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes ``state`` to a temporary file beside ``path``, then renames it over ``path``,
    so a crash mid-save never leaves a truncated checkpoint.

    Raises OSError (with the errno of the failure: ENOSPC, EACCES, ...) naming ``path``
    when the write fails; ``path`` is then left as it was and the temporary file removed.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise OSError(
            error.errno,
            f"cannot write checkpoint {path}: {error.strerror or error}; "
            f"the previous {path.name}, if any, is unchanged",
        ) from error
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
    """Loads a checkpoint on CPU with ``weights_only=True``: tensors and plain containers
    only, so a file crafted to run code when unpickled is refused without running it.

    Raises CheckpointError for a file that is truncated, not a checkpoint, or holds other
    objects, and NonFiniteCheckpointError naming the first bad tensor when the model (or
    its EMA) weights are not all finite: such a run has diverged and cannot be resumed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only=True raises this for any object outside its allowlist.
        raise CheckpointError(
            f"{path}: refused to load: the safe loader (weights_only=True) found something "
            "other than tensors and plain containers, so the file is corrupt or was made to "
            f"run code when unpickled; nothing in it was run ({_unpickler_reason(error)})"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt file?): {_first_line(error)}"
        ) from error
    if not isinstance(state, dict) or not isinstance(model_state(state), dict):
        raise CheckpointError(
            f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict of tensors)"
        )
    weights = {"model": model_state(state)}
    if isinstance(state.get("ema"), dict) and isinstance(state["ema"].get("module"), dict):
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


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    for line in str(error).splitlines():
        if "Unsupported" in line:
            return line.strip().split(". Please use")[0]
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
