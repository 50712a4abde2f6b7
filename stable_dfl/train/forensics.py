"""Which skipped steps the trainer explains, and where each explanation goes.

A skipped step is replayed by :func:`stable_dfl.forensics.explain_step` from the state
before it (a skipped step changed no parameter, and its BatchNorm statistics were put
back), at the loss scale it ran with. At most ``--forensics_steps`` steps are replayed.
An fp16 run's first steps are often skipped while GradScaler lowers its initial scale:
once a skip is explained as a loss-scale overflow, the skips that follow it in a row with
a finite loss are the same calibration, recorded as such and not replayed. Steps that are
taken cost nothing.

The explanation is written to ``<save_dir>/forensics/step_<k>.json`` (by rank 0; under
DDP each rank replays its own shard and the first rank that reproduces the fault is
kept); the step's log lines end with its two or three lines, and its record names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..forensics import LOSS_SCALE_OVERFLOW, StepExplanation, detection_label_facts, explain_step
from ..models import DetectionTargets
from .distributed import DistContext, gather_objects

FORENSICS_DIR = "forensics"
#: Bisection passes per explained step: enough to single out one image of a batch of 16.
MAX_BISECT_REPLAYS = 8


class StepForensics(NamedTuple):
    """What the step's record and log get: the explanation's file (relative to the run
    folder; None when none was written) and the lines to log after the step's."""

    path: str | None
    lines: list[str]


def explanation_path(step: int) -> str:
    """The file of step ``step``'s explanation, relative to the run folder."""
    return f"{FORENSICS_DIR}/step_{step}.json"


class SkippedStepForensics:
    def __init__(
        self,
        max_steps: int,
        save_dir: Path,
        context: DistContext,
        model: nn.Module,
        criterion: nn.Module,
        autocast_dtype: torch.dtype | None,
        image_name: Any,
    ) -> None:
        """``model``: the bare module; ``criterion``: a
        :class:`~stable_dfl.models.DetectionLoss`; ``image_name(index)`` names a training
        image in the logs (its file)."""
        self.remaining = max_steps
        self.save_dir = save_dir
        self.context = context
        self.model = model
        self.criterion = criterion
        self.autocast_dtype = autocast_dtype
        self.image_name = image_name
        #: The explained loss-scale overflow that the current run of skips repeats.
        self.calibration_explained_at: int | None = None

    def step_taken(self) -> None:
        """A step was taken: it ends any run of loss-scale calibration skips."""
        self.calibration_explained_at = None

    def after_skip(
        self,
        step: int,
        loss_finite: bool,
        images: torch.Tensor,
        targets: DetectionTargets,
        indices: torch.Tensor,
        loss_scale: float,
    ) -> StepForensics | None:
        """After step ``step`` was skipped (with the loss scale it ran with): replays it when
        the budget allows; returns the explanation's file and log lines, or None."""
        if self.calibration_explained_at is not None and loss_finite:
            first = self.calibration_explained_at
            return StepForensics(
                explanation_path(first),
                [
                    f"NaN/Inf origin (batch {step}): fp16 loss-scale calibration, as explained "
                    f"at batch {first}; not replayed"
                ],
            )
        if self.remaining == 0:
            return None
        self.remaining -= 1
        try:
            local: StepExplanation | str = self._explain(step, images, targets, indices, loss_scale)
        except Exception as error:  # an explanation is a bonus: it never ends the run
            first_line = str(error).splitlines()[0] if str(error) else ""
            local = f"{type(error).__name__}: {first_line}"
        explanation = self._agreed(local)
        if isinstance(explanation, str):
            return StepForensics(
                None,
                [f"NaN/Inf origin (batch {step}): not found, the replay failed ({explanation})"],
            )
        if explanation.origin.cause == LOSS_SCALE_OVERFLOW:
            self.calibration_explained_at = step
        path = explanation_path(step)
        if self.context.is_main:
            self._write(self.save_dir / path, explanation)
        return StepForensics(path, [*explanation.log_lines(), f"  details: {self.save_dir / path}"])

    def _explain(
        self,
        step: int,
        images: torch.Tensor,
        targets: DetectionTargets,
        indices: torch.Tensor,
        loss_scale: float,
    ) -> StepExplanation:
        label_facts = detection_label_facts(
            targets.labels,
            targets.boxes,
            targets.valid,
            tuple(images.shape[-2:]),
            self.criterion.num_classes,
        )
        index_list = indices.tolist()
        for facts, index in zip(label_facts, index_list, strict=True):
            facts["dataset_index"] = index
        return explain_step(
            self.model,
            self.criterion,
            images,
            targets,
            autocast_dtype=self.autocast_dtype,
            loss_scale=loss_scale,
            image_names=[self.image_name(i) for i in index_list],
            image_facts=label_facts,
            max_replays=MAX_BISECT_REPLAYS,
            step=step,
        )

    def _agreed(self, local: StepExplanation | str) -> StepExplanation | str:
        """The explanation every rank keeps: each replayed its own shard, and the first that
        found where the fault started wins (a failed replay is its error's text)."""
        candidates = gather_objects(local, self.context)
        explanations = [c for c in candidates if isinstance(c, StepExplanation)]
        found = [e for e in explanations if e.origin.stage != "none"]
        return (found or explanations or candidates)[0]

    @staticmethod
    def _write(path: Path, explanation: StepExplanation) -> None:
        """Written aside and renamed: a report never reads half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(explanation.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
