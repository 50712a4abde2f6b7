"""The seed's success criteria (docs/GRADIENT_FIX_QUICKSTART.md), made exact.

The seed asks, after 50 batches: no NaN/Inf warnings, no skipped steps, ``dfl_loss`` in
2-5, gradient norms below 0.5. Taken literally the last one is empty: with
``--gradient_clip_norm 0.5`` the norm the optimizer receives is at most 0.5 by
construction, whatever the model does. The checks below therefore look at both norms:

* ``losses_finite``: every logged loss is finite. FAIL otherwise.
* ``nan_inf_gradients``: steps whose gradients held a NaN/Inf (count, first step,
  parameters named): those with ``grad_finite`` false, and those taken (not skipped) with
  a NaN/Inf ``grad_norm`` whatever ``grad_finite`` says. With fp16 a GradScaler overflows
  on purpose while it calibrates (a skipped step, finite loss, the scale backs off and
  stays >= 1): those are "loss-scale overflows", expected during the first
  ``settle_steps`` and a WARN after them. Any other NaN/Inf step is a FAIL.
* ``skipped_steps``: the same classification for steps the optimizer did not take.
* ``dfl_loss``: median of the last ``window`` steps; FAIL above ``dfl_max`` (5) or if
  not finite. Below 2 is not a failure: the seed's 2-5 describes the first epochs, and a
  DFL that keeps falling towards its minimum (the binary entropy of the target split,
  at most ln 2) is the model learning. WARN when it rises by more than ``dfl_rise``
  between the first and the last window after ``settle_steps``.
* ``grad_norm``: FAIL when a post-clip norm exceeds the clip threshold (clipping not
  applied) or when the pre-clip norm grows by more than ``max_norm_growth`` (median of
  the last window over median of the first window after ``settle_steps``): clipping
  hides an explosion from the optimizer, not from this check. FAIL too, settled or not,
  when a taken step's norm before or after clipping is NaN/Inf, and when no step after
  ``settle_steps`` has a finite pre-clip norm: a norm that cannot be measured is no
  evidence of health.
* ``loss_scale``: FAIL when the fp16 scale ends below 1 (it only falls that far when
  overflows persist); n/a without loss scaling (bf16, fp32).
* ``val_map``: FAIL if not finite; WARN when the last mAP@0.5 of the standard head is no
  better than the untrained model's.

Checks that need steps after ``settle_steps`` (or a finished epoch) are PENDING until
the run gets there.
"""

from __future__ import annotations

import enum
import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .metrics import RunMetrics

#: How many offending parameter names a check lists.
NAMED_PARAMETERS = 5


class Status(str, enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    PENDING = "PENDING"
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class HealthCriteria:
    settle_steps: int = 50
    """The seed's "after 50 batches": warmup and loss-scale calibration come before."""
    window: int = 20
    """Steps whose median gives a "current" value."""
    dfl_max: float = 5.0
    dfl_rise: float = 1.10
    max_norm_growth: float = 10.0


@dataclass
class Check:
    name: str
    """Stable identifier (see the module doc)."""
    label: str
    status: Status
    value: str
    """The measured value, short."""
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    """The numbers behind ``value``, for ``--json``."""


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _median(values: list[float]) -> float:
    finite = _finite(values)
    return statistics.median(finite) if finite else math.nan


def _printable(text: str) -> str:
    """A name from the file as one line that any stdout can encode (no lone surrogates)."""
    return text if text.isprintable() else ascii(text)


def _is_nonfinite_step(record: dict[str, Any]) -> bool:
    finite = record.get("grad_finite")
    if finite is False:
        return True
    skipped = bool(record.get("skipped"))
    if finite is None and skipped:  # older runs: a skip meant a NaN/Inf gradient
        return True
    # A taken step's norm is what the optimizer saw, whatever the guard said.
    return not skipped and not math.isfinite(float(record.get("grad_norm", 0.0)))


def _nonfinite_norm_steps(run: RunMetrics) -> list[int]:
    """Taken steps whose norm before or after clipping is NaN/Inf."""
    bad = []
    for record in run.steps:
        if record.get("skipped"):
            continue
        pre = float(record.get("grad_norm", math.nan))
        if not (math.isfinite(pre) and math.isfinite(pre * float(record.get("clip_coef", 1.0)))):
            bad.append(int(record["step"]))
    return bad


def _loss_scale_overflows(run: RunMetrics) -> set[int]:
    """Steps where an fp16 GradScaler overflowed as designed: finite loss, the scale
    backed off (the record holds the scale after the update) and is still >= 1."""
    overflows = set()
    previous_scale = math.inf
    for record in run.steps:
        scale = float(record.get("loss_scale", 1.0))
        loss = float(record.get("total_loss", math.nan))
        if scale < previous_scale and scale >= 1.0 and math.isfinite(loss):
            overflows.add(int(record["step"]))
        previous_scale = scale
    return overflows


def _check_losses_finite(run: RunMetrics) -> Check:
    bad = [
        int(r["step"])
        for r in run.steps
        if not all(math.isfinite(v) for k, v in r.items() if k.endswith("_loss"))
    ]
    status = Status.FAIL if bad else Status.PASS
    value = f"{len(bad)} steps with NaN/Inf loss" if bad else "all finite"
    detail = f"first at step {bad[0]}" if bad else ""
    return Check(
        "losses_finite",
        "losses finite",
        status,
        value,
        detail,
        {"count": len(bad), "first_step": bad[0] if bad else None},
    )


def _classify(
    steps: list[int], overflows: set[int], criteria: HealthCriteria
) -> tuple[Status, list[int], list[int]]:
    """PASS / WARN (only loss-scale overflows after settling) / FAIL (anything else)."""
    other = [s for s in steps if s not in overflows]
    late_overflows = [s for s in steps if s in overflows and s > criteria.settle_steps]
    if other:
        return Status.FAIL, other, late_overflows
    return (Status.WARN if late_overflows else Status.PASS), other, late_overflows


def _check_nonfinite_gradients(
    run: RunMetrics, overflows: set[int], criteria: HealthCriteria
) -> Check:
    steps = [int(r["step"]) for r in run.steps if _is_nonfinite_step(r)]
    # GradScaler skips the steps it overflows on: a NaN/Inf step that was taken is no overflow.
    taken = {int(r["step"]) for r in run.steps if not r.get("skipped")}
    status, other, late = _classify(steps, overflows - taken, criteria)
    names: list[str] = []
    for record in run.steps:
        for name in record.get("nonfinite_params", []):
            if name not in names:
                names.append(name)
    value = f"{len(steps)} steps" + (f", first at {steps[0]}" if steps else "")
    parts = []
    if steps:
        parts.append(f"{len(steps) - len(other)} loss-scale overflows ({len(late)} after settling)")
    if other:
        parts.append(f"{len(other)} other, first at step {other[0]}")
    if names:
        shown = ", ".join(_printable(name) for name in names[:NAMED_PARAMETERS])
        more = len(names) - NAMED_PARAMETERS
        parts.append(f"in {shown}" + (f" and {more} more" if more > 0 else ""))
    return Check(
        "nan_inf_gradients",
        "NaN/Inf gradients",
        status,
        value,
        "; ".join(parts),
        {
            "count": len(steps),
            "first_step": steps[0] if steps else None,
            "not_loss_scale_overflow": len(other),
            "loss_scale_overflows_after_settling": len(late),
            "parameters": names,
        },
    )


def _check_skipped(run: RunMetrics, overflows: set[int], criteria: HealthCriteria) -> Check:
    skipped = [int(r["step"]) for r in run.steps if r.get("skipped")]
    status, _other, late = _classify(skipped, overflows, criteria)
    applied = [int(r["step"]) for r in run.steps if _is_nonfinite_step(r) and not r.get("skipped")]
    detail = f"{len(late)} loss-scale overflows after step {criteria.settle_steps}" if late else ""
    if applied:
        # Nothing guarded these steps: NaN/Inf reached the weights.
        status = Status.FAIL
        detail = f"{len(applied)} NaN/Inf steps were applied, first at step {applied[0]}"
    return Check(
        "skipped_steps",
        "skipped steps",
        status,
        f"{len(skipped)} of {len(run.steps)}",
        detail,
        {
            "count": len(skipped),
            "after_settling": len([s for s in skipped if s > criteria.settle_steps]),
            "nonfinite_steps_applied": len(applied),
        },
    )


def _settled(run: RunMetrics, criteria: HealthCriteria) -> list[dict[str, Any]]:
    return [r for r in run.steps if int(r["step"]) > criteria.settle_steps]


def _check_dfl(run: RunMetrics, criteria: HealthCriteria) -> Check:
    settled = _settled(run, criteria)
    label = "dfl_loss (seed: 2-5)"
    if not settled:
        return Check("dfl_loss", label, Status.PENDING, f"< {criteria.settle_steps} steps")
    dfl = [float(r.get("dfl_loss", math.nan)) for r in settled]
    current = _median(dfl[-criteria.window :])
    first = _median(dfl[: criteria.window])
    change = current / first if first > 0 else math.nan
    trend = "flat" if abs(change - 1) < 0.05 else ("falling" if change < 1 else "rising")
    values = {"current": current, "first_after_settling": first, "change": change}
    if not math.isfinite(current) or current > criteria.dfl_max:
        status = Status.FAIL
    elif change > criteria.dfl_rise:
        status = Status.WARN
    else:
        status = Status.PASS
    detail = (
        f"{trend}: {first:.2f} at step {criteria.settle_steps} -> {current:.2f} ({change:.2f}x)"
    )
    if math.isfinite(current) and current < 2.0:
        detail += "; below 2 = learned past the seed's early range"
    return Check("dfl_loss", label, status, f"{current:.2f}", detail, values)


def _check_grad_norm(run: RunMetrics, criteria: HealthCriteria) -> Check:
    label = "grad norm (seed: < clip)"
    settled = _settled(run, criteria)
    nonfinite = _nonfinite_norm_steps(run)
    if not settled and not nonfinite:
        return Check("grad_norm", label, Status.PENDING, f"< {criteria.settle_steps} steps")
    ok = [r for r in settled if not _is_nonfinite_step(r)]
    pre = [float(r["grad_norm"]) for r in ok]
    post = [float(r["grad_norm"]) * float(r["clip_coef"]) for r in ok]
    clip = run.clip_norm
    first, current = _median(pre[: criteria.window]), _median(pre[-criteria.window :])
    growth = current / first if first > 0 else math.nan
    max_post = max(_finite(post), default=math.nan)
    clipped = sum(1 for v in pre if clip is not None and v > clip) / max(len(pre), 1)
    values = {
        "pre_clip_current": current,
        "pre_clip_first_after_settling": first,
        "pre_clip_max": max(_finite(pre), default=math.nan),
        "pre_clip_growth": growth,
        "post_clip_max": max_post,
        "clip_norm": clip,
        "fraction_clipped": clipped,
        "nonfinite_norm_steps": len(nonfinite),
        "first_nonfinite_norm_step": nonfinite[0] if nonfinite else None,
    }
    problems = []
    if nonfinite:
        problems.append(
            f"{len(nonfinite)} taken steps with a NaN/Inf norm before or after clipping, "
            f"first at step {nonfinite[0]}"
        )
    if settled and not _finite(pre):
        problems.append(f"no finite pre-clip norm after step {criteria.settle_steps}")
    over_clip = clip is not None and max_post > clip * (1 + 1e-3) + 1e-6
    failed = problems or over_clip or growth > criteria.max_norm_growth
    status = Status.FAIL if failed else Status.PASS
    clip_text = f"{clip:g}" if clip is not None else "?"
    value = f"pre {current:.3g}, post max {max_post:.3g} (clip {clip_text})"
    detail = (
        f"pre-clip {first:.3g} -> {current:.3g} ({growth:.2f}x), {clipped:.0%} of steps clipped"
    )
    return Check("grad_norm", label, status, value, "; ".join([*problems, detail]), values)


def _check_loss_scale(run: RunMetrics) -> Check:
    scales = run.series("loss_scale")
    if not scales or all(s == 1.0 for s in scales):
        return Check("loss_scale", "loss scale", Status.NOT_APPLICABLE, "no loss scaling")
    backoffs = sum(1 for a, b in itertools.pairwise(scales) if b < a)
    values = {"first": scales[0], "min": min(scales), "final": scales[-1], "backoffs": backoffs}
    status = Status.FAIL if scales[-1] < 1.0 else Status.PASS
    value = f"{scales[0]:g} -> {scales[-1]:g} (min {min(scales):g})"
    return Check("loss_scale", "loss scale", status, value, f"{backoffs} back-offs", values)


def _check_val_map(run: RunMetrics) -> Check:
    key = "standard/map50"
    maps = [float(r[key]) for r in run.evaluations if key in r]
    if len(maps) < 2:
        return Check("val_map", "val mAP@0.5", Status.PENDING, "no epoch finished yet")
    last = run.evaluations[-1]
    heads = {k: float(v) for k, v in last.items() if k.endswith("/map50") or k.endswith("/map")}
    values = {"untrained": maps[0], "best": max(maps), **heads}
    if not all(math.isfinite(v) for v in heads.values()):
        status = Status.FAIL
    else:
        status = Status.PASS if maps[-1] > maps[0] else Status.WARN
    value = ", ".join(f"{_printable(k)} {v:.3f}" for k, v in heads.items() if k.endswith("map50"))
    return Check(
        "val_map",
        "val mAP@0.5",
        status,
        value,
        f"untrained {maps[0]:.3f}, best {max(maps):.3f}",
        values,
    )


def judge_run(run: RunMetrics, criteria: HealthCriteria | None = None) -> list[Check]:
    criteria = criteria or HealthCriteria()
    overflows = _loss_scale_overflows(run)
    return [
        _check_losses_finite(run),
        _check_nonfinite_gradients(run, overflows, criteria),
        _check_skipped(run, overflows, criteria),
        _check_dfl(run, criteria),
        _check_grad_norm(run, criteria),
        _check_loss_scale(run),
        _check_val_map(run),
    ]


def is_healthy(checks: list[Check]) -> bool:
    return all(check.status is not Status.FAIL for check in checks)
