"""Where training reports go: the debug log, metrics JSONL, a progress line, TensorBoard/W&B.

Only rank 0 reports; the other ranks get a :class:`Reporter` whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

DEBUG_LOG_NAME = "training_debug.log"
METRICS_NAME = "metrics.jsonl"


class Reporter:
    """Writes the human log (``training_debug.log``, echoed to the console) and the
    machine-readable metrics (``metrics.jsonl``, one JSON object per line).

    On a terminal the per-batch lines go to the log file only and the console shows a
    progress line instead; otherwise (CI, redirected output) the console gets the
    same plain lines as the file.
    """

    def __init__(self, save_dir: Path, enabled: bool, console: TextIO | None = None) -> None:
        self.enabled = enabled
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

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        _write(self._metrics, json.dumps(record) + "\n")
        numeric = {
            k: v
            for k, v in record.items()
            if isinstance(v, int | float) and k not in ("time", "step")
        }
        for logger in self._external:
            logger.log(record.get("kind", "step"), numeric, record.get("step", 0))

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
