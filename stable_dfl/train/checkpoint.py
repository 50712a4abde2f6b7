"""Checkpoints: what a training checkpoint holds and how a run resumes from one or takes
its weights (``--init_from``); atomic saves, safe loads (``weights_only=True``), refusal of
non-finite weights and of other layout versions."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from .config import TrainConfig
from .ema import ModelEMA

#: The layout of a training checkpoint (the keys below and what they hold). A change that
#: a trainer of another version would misread bumps it.
CHECKPOINT_VERSION = 1
#: What a resume needs from a checkpoint (a bare state_dict only serves --init_from).
RESUME_KEYS = ("model", "ema", "optimizer", "scaler", "scheduler", "epoch", "step", "rng")


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

    Raises CheckpointError for a file that is truncated, not a checkpoint, holds other
    objects, or is a training checkpoint of another :data:`CHECKPOINT_VERSION` (a bare
    state_dict has no version and loads), and NonFiniteCheckpointError naming the first bad
    tensor when the model (or its EMA) weights are not all finite: such a run has diverged
    and cannot be resumed.
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
    _check_version(path, state)
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


def _check_version(path: Path, state: dict) -> None:
    version = state.get("version")
    # No int version: a bare state_dict (a tensor named "version" is one of its weights).
    if not isinstance(version, int) or version == CHECKPOINT_VERSION:
        return
    if version > CHECKPOINT_VERSION:
        origin, remedy = "a newer", "upgrade stable_dfl to use it"
    else:
        origin, remedy = (
            "an older",
            "use it with the stable_dfl that wrote it, or start fresh (drop --resume / --init_from)",
        )
    raise CheckpointError(
        f"{path}: checkpoint version {version}, but this stable_dfl reads version "
        f"{CHECKPOINT_VERSION} only (the file comes from {origin} stable_dfl); {remedy}"
    )


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    for line in str(error).splitlines():
        if "Unsupported" in line:
            return line.strip().split(". Please use")[0]
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------- the trainer's state


class TrainingState(Protocol):
    """The parts of a trainer that a checkpoint saves and a resume restores."""

    model: nn.Module
    ema: ModelEMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int
    """Epochs completed."""
    step: int
    """Batches seen (optimizer steps taken or skipped)."""
    skipped_steps: int
    consecutive_skips: int
    best_fitness: float
    epoch_batches_done: int
    """Batches of the epoch in progress already trained (0 at an epoch's end)."""
    epoch_steps_taken: int
    """Of those, the optimizer steps not skipped: what the epoch's mean losses divide by."""
    epoch_loss_sums: dict[str, float]
    run_id: str
    class_names: tuple[str, ...]
    config: TrainConfig


def checkpoint_state(trainer: TrainingState) -> dict[str, Any]:
    """What a training checkpoint holds: everything a resume needs to continue bit for bit."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "version": CHECKPOINT_VERSION,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "skipped_steps": trainer.skipped_steps,
        "consecutive_skips": trainer.consecutive_skips,
        "best_fitness": trainer.best_fitness,
        "epoch_batches_done": trainer.epoch_batches_done,
        "epoch_steps_taken": trainer.epoch_steps_taken,
        "epoch_loss_sums": dict(trainer.epoch_loss_sums),
        "run_id": trainer.run_id,
        "rng": rng,
        "class_names": list(trainer.class_names),
        "config": trainer.config.to_dict(),
    }


def write_checkpoints(
    state: dict[str, Any], save_dir: Path, epoch: int, is_best: bool, save_period: int
) -> None:
    """``last.pt``; ``best.pt`` too when ``is_best``; ``epoch<N>.pt`` every ``save_period``
    epochs (0: never)."""
    save_checkpoint(state, save_dir / "last.pt")
    if is_best:
        save_checkpoint(state, save_dir / "best.pt")
    if save_period and epoch % save_period == 0:
        save_checkpoint(state, save_dir / f"epoch{epoch}.pt")


def restore_checkpoint(trainer: TrainingState, path: Path, batches_per_epoch: int) -> None:
    """Puts the state of the training checkpoint at ``path`` back into ``trainer``, RNGs
    included. Raises CheckpointError as :func:`load_checkpoint` does, for a bare
    state_dict or another model's checkpoint, and for one saved in the middle of an epoch
    longer than ``batches_per_epoch`` (the batch size or the data changed)."""
    state = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this trainer (no {', '.join(missing)}); "
            "to start from bare weights use --init_from"
        )
    check_model_shapes(trainer.model, path, state["model"])
    trainer.model.load_state_dict(state["model"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.epoch, trainer.step = int(state["epoch"]), int(state["step"])
    trainer.skipped_steps = int(state["skipped_steps"])
    trainer.best_fitness = float(state["best_fitness"])
    trainer.consecutive_skips = int(state.get("consecutive_skips", 0))
    # Absent from checkpoints written before a stop could save mid-epoch.
    done = int(state.get("epoch_batches_done", 0))
    if done > batches_per_epoch:
        raise CheckpointError(
            f"{path}: saved after batch {done} of epoch {trainer.epoch + 1}, but an epoch has "
            f"{batches_per_epoch} batches here: resume with the --batch_size and data it was "
            "trained with"
        )
    trainer.epoch_batches_done = done
    trainer.epoch_steps_taken = int(state.get("epoch_steps_taken", done))
    trainer.epoch_loss_sums = {k: float(v) for k, v in state.get("epoch_loss_sums", {}).items()}
    trainer.run_id = str(state.get("run_id", trainer.run_id))
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def check_model_shapes(model: nn.Module, path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Raises CheckpointError unless ``weights`` has exactly the tensors and shapes of ``model``."""
    own = model.state_dict()
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    mismatched = [
        f"{k}: {tuple(weights[k].shape)} in the checkpoint, {tuple(v.shape)} here"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: written for a different model (model options such as --width, "
            f"--fpn_channels, --embed_dim, --n_bins or the classes differ?): "
            f"{len(mismatched)} shapes differ {mismatched[:3]}, {len(missing)} tensors "
            f"missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )


class LoadedWeights(NamedTuple):
    """Tensor counts of an ``--init_from``: of the model's, those loaded and those missing
    from the file; of the file's, those the model does not have."""

    loaded: int
    missing: int
    unexpected: int


def init_weights_from(model: nn.Module, path: str | Path) -> LoadedWeights:
    """Loads the weights of a checkpoint into ``model`` (its EMA weights for a training
    checkpoint, else the bare state_dict), tensors absent on either side left out. Raises
    CheckpointError when a tensor of both has another shape."""
    state = load_checkpoint(path)
    weights = state["ema"]["module"] if isinstance(state.get("ema"), dict) else model_state(state)
    own = model.state_dict()
    mismatched = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(
            f"{path}: shapes differ from this model for {mismatched[:5]} (model options differ?)"
        )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    return LoadedWeights(len(own) - len(missing), len(missing), len(unexpected))
