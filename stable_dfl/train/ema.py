"""Exponential moving average of model weights (as in YOLOv5/v8), used for validation."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """``ema = d * ema + (1 - d) * weights`` after each optimizer step that was taken.

    ``d = decay * (1 - exp(-updates / ramp))`` ramps up from 0 so the average does not
    hold on to the random initial weights. Buffers (BatchNorm statistics) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, ramp: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.ramp = ramp
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        for ema_value, value in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
