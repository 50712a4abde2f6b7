"""What the trainer needs from an optimizer step, whichever step it runs.

:class:`~stable_dfl.guard.GradGuard` (``--nan_guard on``) and
:class:`~stable_dfl.train.plain_step.PlainClipStep` (``--nan_guard off``) both satisfy
:class:`OptimizerStepper`, and their results (:class:`~stable_dfl.guard.GradGuardResult`,
:class:`~stable_dfl.train.plain_step.PlainStepResult`) both satisfy :class:`StepOutcome`.
The typing is structural, so the guard, a lower layer, does not import this module.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StepOutcome(Protocol):
    """What one optimizer step did with the gradients."""

    @property
    def total_norm(self) -> float:
        """L2 norm of the gradients before clipping (the guard leaves NaN/Inf tensors out)."""

    @property
    def clip_coef(self) -> float:
        """Factor the gradients were multiplied by (1.0 when not clipped)."""

    @property
    def finite(self) -> bool:
        """No gradient held a NaN/Inf."""

    @property
    def skipped(self) -> bool:
        """The optimizer step was not taken."""

    @property
    def offenders(self) -> list[str]:
        """Names of parameters whose gradients held a NaN/Inf (empty when not known)."""


@runtime_checkable
class OptimizerStepper(Protocol):
    """Unscales, clips and steps (or skips) after ``scaler.scale(loss).backward()``."""

    def step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> StepOutcome: ...
