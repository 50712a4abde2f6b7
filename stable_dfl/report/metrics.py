"""Reads the trainer's ``metrics.jsonl`` (one JSON object per line), never the text log.

The records and their fields are those of :mod:`stable_dfl.train.records`: the step
records, and the ``val`` (the untrained model) and ``epoch`` records, which carry the
validation mAP.

A run that is still being written may end in a partial line: it is ignored. A resumed run
repeats the steps after its last checkpoint; the later record of a step wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.records import EVALUATION_KINDS, METRICS_NAME, STEP_KIND


@dataclass
class RunMetrics:
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Step records (:class:`~stable_dfl.train.records.StepRecord`) in step order, one per step."""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """``val`` and ``epoch`` records (:class:`~stable_dfl.train.records.ValRecord`,
    :class:`~stable_dfl.train.records.EpochRecord`), in step order."""
    unreadable_lines: int = 0
    """Lines that are not JSON, other than a partial last line."""

    def series(self, name: str) -> list[float]:
        """One step field as floats (NaN where a record lacks it)."""
        return [_as_float(record.get(name)) for record in self.steps]

    def post_clip_norms(self) -> list[float]:
        """Norm of the gradients the optimizer received: ``grad_norm * clip_coef``."""
        return [
            norm * coef
            for norm, coef in zip(self.series("grad_norm"), self.series("clip_coef"), strict=True)
        ]

    @property
    def clip_norm(self) -> float | None:
        values = [v for v in self.series("clip_norm") if math.isfinite(v)]
        return values[-1] if values else None


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else math.nan


def metrics_path(run: str | Path) -> Path:
    """``run`` may be the run folder or the metrics file itself."""
    path = Path(run)
    return path / METRICS_NAME if path.is_dir() else path


def load_run(run: str | Path) -> RunMetrics:
    """Raises ``FileNotFoundError`` when there is no metrics file."""
    path = metrics_path(run)
    # Text after the last newline is a record still being written (or an empty string).
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]
    metrics = RunMetrics(path)
    steps: dict[int, dict[str, Any]] = {}
    evaluations: dict[tuple[str, int], dict[str, Any]] = {}
    for line in complete:
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # accepts the NaN / Infinity that json.dumps writes
        except json.JSONDecodeError:
            metrics.unreadable_lines += 1
            continue
        kind = record.get("kind")
        if kind == STEP_KIND:
            steps[int(record["step"])] = record
        elif kind in EVALUATION_KINDS:
            evaluations[(kind, int(record.get("step", 0)))] = record
    metrics.steps = [steps[k] for k in sorted(steps)]
    metrics.evaluations = sorted(evaluations.values(), key=lambda r: int(r.get("step", 0)))
    return metrics
