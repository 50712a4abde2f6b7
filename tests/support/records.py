"""Records of ``metrics.jsonl`` for the tests, built by the schema."""

from __future__ import annotations

from typing import Any

from stable_dfl.train.records import StepRecord


def healthy_step(step: int, **fields: Any) -> StepRecord:
    """A step of epoch 1 whose gradients were finite and whose update was taken; ``fields``
    give the rest (losses, norms, lr, ...) and may replace any of these."""
    healthy = dict(
        epoch=1,
        grad_finite=True,
        nonfinite_params=[],
        loss_scale=1.0,
        skipped=False,
        skipped_total=0,
    )
    return StepRecord(step=step, **{**healthy, **fields})
