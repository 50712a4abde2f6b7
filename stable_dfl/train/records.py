"""The records of ``metrics.jsonl``: written by the trainer, read by :mod:`stable_dfl.report`.

One JSON object per line: ``time`` (Unix seconds) and ``run_id`` (12 hex digits, the same
for a run and its resumes, another for a new run in the same folder), both added by the
:class:`~stable_dfl.train.reporting.Reporter`, then ``kind`` and the fields of the record's
class below in their order, a dict field's items in its place. ``json.dumps`` writes a
NaN or an Inf as ``NaN`` / ``Infinity``; ``json.loads`` reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

METRICS_NAME = "metrics.jsonl"

STEP_KIND = "step"
VAL_KIND = "val"
EPOCH_KIND = "epoch"
RESUME_KIND = "resume"
#: The kinds that carry the validation mAP of each head.
EVALUATION_KINDS = (VAL_KIND, EPOCH_KIND)


@dataclass(frozen=True)
class Record:
    """The fields every record starts with; each kind of record is a subclass."""

    kind: ClassVar[str]
    epoch: int
    step: int
    """Batches seen when the record was written (optimizer steps taken or skipped)."""

    def to_json(self) -> dict[str, Any]:
        """The record as written, before ``time``: ``kind`` first, dict fields spread."""
        record: dict[str, Any] = {"kind": self.kind}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, dict):
                record.update(value)
            else:
                record[item.name] = value
        return record


@dataclass(frozen=True)
class StepRecord(Record):
    """One batch, whether its optimizer step was taken or skipped; ``epoch`` counts from 1."""

    kind: ClassVar[str] = STEP_KIND
    losses: dict[str, float]
    """``total_loss``, ``cls_loss``, ``iou_loss``, ``dfl_loss`` and each per head
    (``dfl_loss_standard``, ...), averaged over the ranks."""
    grad_norm: float
    """Before clipping."""
    clip_coef: float
    clip_norm: float
    """``--gradient_clip_norm``."""
    grad_finite: bool
    nonfinite_params: list[str]
    """The first parameters whose gradients held a NaN/Inf."""
    loss_scale: float
    """The fp16 GradScaler's scale after this step's update; 1.0 without loss scaling."""
    skipped: bool
    skipped_total: int
    lr: float
    images_per_s: float
    forensics: str | None = None
    """The file, relative to the run folder, explaining why this skipped step went
    non-finite (:mod:`stable_dfl.train.forensics`); None when it was not replayed."""


@dataclass(frozen=True)
class ValRecord(Record):
    """The untrained model's validation, before the first step (``epoch`` and ``step`` 0)."""

    kind: ClassVar[str] = VAL_KIND
    results: dict[str, float]
    """``<head>/map50`` and ``<head>/map`` of each head, from the EMA weights."""


@dataclass(frozen=True)
class EpochRecord(Record):
    """An epoch ended (``epoch`` of them so far) and was validated."""

    kind: ClassVar[str] = EPOCH_KIND
    losses: dict[str, float]
    """The epoch's mean of each loss of :class:`StepRecord`."""
    results: dict[str, float]
    """As in :class:`ValRecord`."""
    skipped_total: int
    epoch_seconds: float


@dataclass(frozen=True)
class ResumeRecord(Record):
    """Training resumed from a checkpoint of ``epoch`` and ``step``: records of a killed run
    at the same or later steps are superseded by those written after this one."""

    kind: ClassVar[str] = RESUME_KIND
