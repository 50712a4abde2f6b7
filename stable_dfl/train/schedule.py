"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math


class WarmupCosine:
    """LR factor for ``torch.optim.lr_scheduler.LambdaLR``, stepped once per optimizer step.

    Steps ``0 .. warmup_steps - 1`` ramp linearly from ``1 / warmup_steps`` to 1; the rest
    follow a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``. A callable
    object (not a lambda) so that LambdaLR's state_dict records it.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = min(warmup_steps, self.total_steps)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
