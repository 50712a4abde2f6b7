"""Why a step went non-finite: a replay of its batch with hooks, off the hot path.

:func:`explain_step` names the first NaN/Inf of a step: in the input, the first module's
forward output (with an overflow of the autocast dtype told from a NaN that float32
makes too), the first loss component, or the first gradient in backward order (with an
fp16 loss-scale overflow told from a real one), and bisects the batch for the images that
reproduce it. The trainer calls it on skipped steps (``--forensics_steps``); a custom
loop or another framework's callback calls it the same way.
"""

from .explain import (
    AUTOCAST_OVERFLOW,
    LOSS_SCALE_OVERFLOW,
    NONFINITE_IN_FP32,
    NONFINITE_INPUT,
    NOT_REPRODUCED,
    STAGES,
    VERDICTS,
    Origin,
    StepExplanation,
    explain_step,
)
from .images import box_facts, detection_label_facts, pixel_facts
from .select import select_batch
from .trace import Magnitude

__all__ = [
    "AUTOCAST_OVERFLOW",
    "LOSS_SCALE_OVERFLOW",
    "NONFINITE_INPUT",
    "NONFINITE_IN_FP32",
    "NOT_REPRODUCED",
    "STAGES",
    "VERDICTS",
    "Magnitude",
    "Origin",
    "StepExplanation",
    "box_facts",
    "detection_label_facts",
    "explain_step",
    "pixel_facts",
    "select_batch",
]
