"""The textbook AMP step without a NaN/Inf guard, for before/after experiments.

``scaler.unscale_`` + ``clip_grad_norm_`` + ``scaler.step`` + ``scaler.update``, with the
same ``step(optimizer, scaler)`` call and result fields as :class:`~stable_dfl.GradGuard`
(:class:`~stable_dfl.train.step.OptimizerStepper`, :class:`~stable_dfl.train.step.StepOutcome`).
With an active fp16 GradScaler the scaler still skips a step whose gradients hold an
Inf/NaN; without one (bf16 or full precision) nothing checks, and ``optimizer.step()``
writes NaN into the weights. Offending parameters are not named: finding them is what
the guard adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..guard import CLIP_EPS


@dataclass(frozen=True)
class PlainStepResult:
    total_norm: float
    """Gradient norm before clipping (NaN/Inf when a gradient is)."""
    clip_coef: float
    finite: bool
    skipped: bool
    """True only when an fp16 GradScaler found an Inf/NaN and skipped the step."""
    offenders: list[str] = field(default_factory=list)


class PlainClipStep:
    def __init__(self, model: nn.Module, max_norm: float) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = max_norm

    def step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> PlainStepResult:
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.unscale_(optimizer)
        total_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm))
        scaler.step(optimizer)
        scaler.update()
        # GradScaler lowers its scale exactly when it skipped the step for an Inf/NaN.
        skipped = scale_before is not None and scaler.get_scale() < scale_before
        finite = math.isfinite(total_norm)
        clip_coef = min(1.0, self.max_norm / (total_norm + CLIP_EPS)) if finite else 1.0
        return PlainStepResult(total_norm, clip_coef, finite, skipped)
