"""The guarded optimizer step: unscale, find non-finite gradients, clip, then step or skip.

Same interface as :class:`stable_dfl.guard.GradGuard` (``step(optimizer, scaler)``
returning ``total_norm``, ``clip_coef``, ``finite``, ``skipped``, ``offenders``), so the
trainer can use either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepResult:
    total_norm: float
    """Gradient norm over all parameters after unscaling, before clipping (inf/nan if non-finite)."""
    clip_coef: float
    """Factor the gradients were multiplied by (1.0 when not clipped)."""
    finite: bool
    skipped: bool
    offenders: list[str] = field(default_factory=list)
    """Names of the parameters whose gradient holds a NaN or an Inf."""


class GuardedStep:
    """Skips the optimizer step when any gradient is non-finite, else clips to ``max_norm``.

    The check runs after ``scaler.unscale_``: before it, fp16 gradients are scaled by the
    loss scale, and an overflow of the scaled values says nothing about the true ones.
    ``scaler.update()`` runs either way, so a skipped fp16 step still lowers the scale.
    """

    def __init__(self, model: nn.Module, max_norm: float) -> None:
        self.named_parameters = [
            (name, p) for name, p in model.named_parameters() if p.requires_grad
        ]
        self.max_norm = max_norm

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> StepResult:
        scaler.unscale_(optimizer)
        with_grad = [(name, p.grad) for name, p in self.named_parameters if p.grad is not None]
        # One device-to-host transfer for all the flags, not one per parameter.
        finite_flags = torch.stack([torch.isfinite(grad).all() for _, grad in with_grad]).tolist()
        offenders = [name for (name, _), ok in zip(with_grad, finite_flags, strict=True) if not ok]
        total_norm = float(torch.nn.utils.get_total_norm([grad for _, grad in with_grad]))
        if offenders:
            scaler.update()
            return StepResult(total_norm, 1.0, finite=False, skipped=True, offenders=offenders)
        clip_coef = min(1.0, self.max_norm / (total_norm + 1e-6))
        if clip_coef < 1.0:
            for _, grad in with_grad:
                grad.mul_(clip_coef)
        scaler.step(optimizer)
        scaler.update()
        return StepResult(total_norm, clip_coef, finite=True, skipped=False)
