"""Where training reports go (the debug log, metrics JSONL, a progress line, TensorBoard/W&B)
and what the trainer reports: the lines and records of a step, of the untrained model and
of an epoch.

Only rank 0 reports; the other ranks get a :class:`Reporter` whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from ..models import HEAD_NAMES
from .config import TrainConfig
from .records import METRICS_NAME, EpochRecord, Record, StepRecord, ValRecord
from .step import StepOutcome

DEBUG_LOG_NAME = "training_debug.log"
#: Offending parameter names listed one per line before the rest are counted; the step
#: record keeps as many.
MAX_NAMED_OFFENDERS = 10


class Reporter:
    """Writes the human log (``training_debug.log``, echoed to the console) and the
    machine-readable metrics (``metrics.jsonl``, one JSON object per line).

    On a terminal the per-batch lines go to the log file only and the console shows a
    progress line instead; otherwise (CI, redirected output) the console gets the
    same plain lines as the file.
    """

    def __init__(
        self, save_dir: Path, enabled: bool, run_id: str, console: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        #: Written into every record: a metrics file that holds two runs tells them apart.
        self.run_id = run_id
        self.console = console or sys.stdout
        self.interactive = enabled and self.console.isatty()
        self._progress_shown = False
        self._log: TextIO | None = None
        self._metrics: TextIO | None = None
        self._external: list[Any] = []
        if enabled:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                self._log = open(save_dir / DEBUG_LOG_NAME, "a", buffering=1, encoding="utf-8")
                self._metrics = open(save_dir / METRICS_NAME, "a", buffering=1, encoding="utf-8")
            except OSError as error:
                raise OSError(
                    error.errno, f"cannot write to the run folder {save_dir}: {error}"
                ) from error

    def info(self, message: str) -> None:
        """A line for the log file and the console."""
        if not self.enabled:
            return
        self._write_log(message)
        self._clear_progress()
        print(message, file=self.console, flush=True)

    def detail(self, message: str) -> None:
        """A line for the log file, and the console unless it shows the progress line."""
        if not self.enabled:
            return
        self._write_log(message)
        if not self.interactive:
            print(message, file=self.console, flush=True)

    def progress(self, message: str) -> None:
        """Rewrites the progress line (terminal only)."""
        if self.interactive:
            self.console.write("\r" + message[: _terminal_width() - 1].ljust(_terminal_width() - 1))
            self.console.flush()
            self._progress_shown = True

    def status(self, message: str) -> None:
        """A line of work in progress: the progress line on a terminal, else a detail line."""
        if self.interactive:
            self.progress(message)
        else:
            self.detail(message)

    def metrics(self, record: Record) -> None:
        """A line of ``metrics.jsonl`` (see :mod:`~stable_dfl.train.records`); its numbers
        also go to the external loggers."""
        if not self.enabled:
            return
        line = {"time": round(time.time(), 3), "run_id": self.run_id, **record.to_json()}
        _write(self._metrics, json.dumps(line) + "\n")
        numeric = {
            k: v
            for k, v in line.items()
            if isinstance(v, int | float) and k not in ("time", "step")
        }
        for logger in self._external:
            logger.log(record.kind, numeric, record.step)

    def add_external(self, logger: Any) -> None:
        self._external.append(logger)

    def close(self) -> None:
        self._clear_progress()
        for logger in self._external:
            logger.close()
        for file in (self._log, self._metrics):
            if file is not None:
                file.close()

    def _write_log(self, message: str) -> None:
        _write(self._log, message + "\n")

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self.console.write("\r" + " " * (_terminal_width() - 1) + "\r")
            self._progress_shown = False


def _write(file: TextIO, text: str) -> None:
    """Writes ``text``; a failure (disk full, ...) is raised naming the file."""
    try:
        file.write(text)
    except OSError as error:
        raise OSError(error.errno, f"cannot write to {file.name}: {error}") from error


def _terminal_width() -> int:
    return os.get_terminal_size().columns if sys.stdout.isatty() else 120


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """W&B run; offline (files under the run folder, synced later) unless an API key is set,
    so a missing login or network never blocks training."""

    def __init__(self, save_dir: Path, config: dict[str, Any], project: str) -> None:
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=project, dir=str(save_dir), config=config, mode=mode)

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{kind}/{name}": value for name, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def attach_external_loggers(
    reporter: Reporter, save_dir: Path, config: dict[str, Any], tensorboard: bool, wandb: bool
) -> None:
    """Adds the requested loggers whose packages are installed; says which were skipped."""
    if not reporter.enabled:
        return
    if tensorboard:
        try:
            reporter.add_external(TensorBoardLogger(save_dir / "tensorboard"))
        except ImportError:
            reporter.info(
                "TensorBoard requested but not installed (pip install tensorboard): skipping it"
            )
    if wandb:
        try:
            reporter.add_external(WandbLogger(save_dir, config, project="stable_dfl"))
        except ImportError:
            reporter.info(
                "W&B requested but wandb is not installed (pip install wandb): skipping it"
            )


# ------------------------------------------------------------------ what the trainer reports


def loss_scale(scaler: torch.amp.GradScaler) -> float:
    """The fp16 GradScaler's scale; 1.0 without loss scaling."""
    return scaler.get_scale() if scaler.is_enabled() else 1.0


def module_grad_norms(model: nn.Module, scale: float) -> dict[str, float]:
    """Gradient norm of each top-level part, for the debug block; ``scale`` is the loss
    scale of the gradients (read before the step unscales them)."""
    norms = {}
    for name, module in model.named_children():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norms[name] = float(torch.nn.utils.get_total_norm(grads)) / scale if grads else 0.0
    return norms


def format_map(results: dict[str, float]) -> str:
    return "; ".join(
        f"{head} head mAP@0.5={results[f'{head}/map50']:.4f} mAP@0.5:0.95={results[f'{head}/map']:.4f}"
        for head in HEAD_NAMES
    )


def report_step(
    reporter: Reporter,
    config: TrainConfig,
    *,
    epoch: int,
    batch: int,
    batches: int,
    step: int,
    losses: dict[str, float],
    outcome: StepOutcome,
    module_norms: dict[str, float] | None,
    forensics: tuple[str | None, list[str]] | None,
    lr: float,
    scale: float,
    skipped_total: int,
    images_per_second: float,
) -> None:
    """One batch: a warning per offender of a skipped step, the batch line every
    ``log_interval`` steps, the debug block when ``module_norms`` were measured, the
    progress line and the step record. ``forensics``: the file of the step's explanation
    (relative to the run folder, named by the record) and its log lines, which follow the
    skip's; None when it was not explained. ``epoch`` counts from 1, ``batch`` within it."""
    if outcome.skipped:
        for name in outcome.offenders[:MAX_NAMED_OFFENDERS]:
            reporter.info(f"⚠️ NaN/Inf gradient in {name}")
        if len(outcome.offenders) > MAX_NAMED_OFFENDERS:
            reporter.info(
                f"⚠️ NaN/Inf gradient in {len(outcome.offenders) - MAX_NAMED_OFFENDERS} more parameters"
            )
        reporter.info(
            f"Skipping optimizer step (batch {step}, {skipped_total} skipped so far): "
            f"Grad Norm={outcome.total_norm}"
        )
    for line in forensics[1] if forensics else []:
        reporter.info(line)
    if step == 1 or step % config.log_interval == 0:
        reporter.detail(
            f"Batch {step}: dfl_loss={losses['dfl_loss']:.2f}, Grad Norm={outcome.total_norm:.2f}, "
            f"cls_loss={losses['cls_loss']:.3f}, iou_loss={losses['iou_loss']:.3f}, lr={lr:.2e}"
        )
    if module_norms is not None:
        lines = ["Loss components:"] + [f"  {name}: {value:.4f}" for name, value in losses.items()]
        lines.append("Gradient Norms:")
        lines += [f"  {name}: {value:.4f}" for name, value in module_norms.items()]
        lines += [
            f"  Total Grad Norm: {outcome.total_norm:.4f}",
            f"  Clip Coef: {outcome.clip_coef:.4f}",
            f"  Loss Scale: {scale:g}",
        ]
        for line in lines:
            reporter.detail(line)
    reporter.progress(
        f"epoch {epoch}/{config.epochs} batch {batch}/{batches} loss {losses['total_loss']:.3f} "
        f"dfl {losses['dfl_loss']:.2f} grad {outcome.total_norm:.2f} {images_per_second:.0f} img/s"
    )
    reporter.metrics(
        StepRecord(
            epoch=epoch,
            step=step,
            losses=losses,
            grad_norm=outcome.total_norm,
            clip_coef=outcome.clip_coef,
            clip_norm=config.gradient_clip_norm,
            grad_finite=outcome.finite,
            nonfinite_params=outcome.offenders[:MAX_NAMED_OFFENDERS],
            loss_scale=scale,
            skipped=outcome.skipped,
            skipped_total=skipped_total,
            lr=lr,
            images_per_s=round(images_per_second, 2),
            forensics=forensics[0] if forensics else None,
        )
    )


def report_untrained(reporter: Reporter, results: dict[str, float]) -> None:
    reporter.info(f"Untrained model: {format_map(results)}")
    reporter.metrics(ValRecord(epoch=0, step=0, results=results))


def report_epoch(
    reporter: Reporter,
    config: TrainConfig,
    *,
    epoch: int,
    step: int,
    losses: dict[str, float],
    results: dict[str, float],
    skipped_total: int,
    seconds: float,
) -> None:
    """``epoch`` epochs are done: their mean losses and the validation of the EMA weights."""
    reporter.info(
        f"Epoch {epoch}/{config.epochs}: "
        + ", ".join(f"{k}={v:.4f}" for k, v in losses.items())
        + f", skipped steps={skipped_total}, {seconds:.1f}s; val {format_map(results)}"
    )
    reporter.metrics(
        EpochRecord(
            epoch=epoch,
            step=step,
            losses=losses,
            results=results,
            skipped_total=skipped_total,
            epoch_seconds=round(seconds, 3),
        )
    )
