"""PNG plots of a run's metrics (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .forensics import explained_steps
from .metrics import RunMetrics

LOSS_COMPONENTS = ("total_loss", "cls_loss", "iou_loss", "dfl_loss")
MAP_KEYS = ("standard/map50", "prototype/map50")


def _steps(run: RunMetrics) -> list[int]:
    return [int(r["step"]) for r in run.steps]


def _mark_skipped(axis, run: RunMetrics) -> None:
    skipped = [int(r["step"]) for r in run.steps if r.get("skipped")]
    for index, step in enumerate(skipped):
        axis.axvline(
            step, color="red", alpha=0.25, lw=0.8, label="skipped step" if index == 0 else None
        )


def _mark_explained(axis, run: RunMetrics) -> None:
    """A dashed black line at each replayed step (the one its explanation is named after)."""
    replayed = [e.steps[0] for e in explained_steps(run)]
    for index, step in enumerate(replayed):
        axis.axvline(
            step, color="black", ls="--", lw=1, label="explained step" if index == 0 else None
        )


def _positive(values: list[float]) -> list[float]:
    """For log axes: non-positive and non-finite values become gaps."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def _draw_run(axes, run: RunMetrics, name: str, style: str, colour_offset: int) -> None:
    steps = _steps(run)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    prefix = f"{name}: " if name else ""
    for i, component in enumerate(LOSS_COMPONENTS):
        axes[0].plot(
            steps,
            _positive(run.series(component)),
            style,
            color=colours[(i + colour_offset) % 10],
            lw=1,
            label=prefix + component,
        )
    axes[1].plot(
        steps,
        _positive(run.series("grad_norm")),
        style,
        color=colours[colour_offset % 10],
        lw=1,
        label=prefix + "before clipping",
    )
    axes[1].plot(
        steps,
        _positive(run.post_clip_norms()),
        style,
        color=colours[(colour_offset + 1) % 10],
        lw=1,
        label=prefix + "after clipping",
    )
    if run.clip_norm is not None:
        axes[1].axhline(
            run.clip_norm, color="black", ls=":", lw=1, label=prefix + f"clip {run.clip_norm:g}"
        )
    axes[2].plot(
        steps,
        _positive(run.series("loss_scale")),
        style,
        color=colours[colour_offset % 10],
        label=prefix + "loss scale",
    )
    axes[3].plot(
        steps, run.series("lr"), style, color=colours[colour_offset % 10], label=prefix + "lr"
    )
    for i, key in enumerate(MAP_KEYS):
        points = [(int(r["step"]), float(r[key])) for r in run.evaluations if key in r]
        if points:
            axes[4].plot(
                *zip(*points, strict=True),
                style,
                marker="o",
                color=colours[(i + colour_offset) % 10],
                label=prefix + key,
            )
    skipped_total = [float(r.get("skipped_total", 0)) for r in run.steps]
    axes[5].plot(
        steps,
        skipped_total,
        style,
        color=colours[colour_offset % 10],
        label=prefix + "skipped (cumulative)",
    )
    for axis in axes[:4]:
        _mark_skipped(axis, run)
    _mark_explained(axes[0], run)


def _figure(runs: list[tuple[str, RunMetrics]], title: str, path: Path) -> Path:
    figure, grid = plt.subplots(3, 2, figsize=(13, 11))
    axes = grid.ravel()
    for index, (name, run) in enumerate(runs):
        _draw_run(axes, run, name, "-" if index == 0 else "--", colour_offset=index * 4)
    titles = (
        ("loss components", "loss", True),
        ("total gradient norm", "L2 norm", True),
        ("loss scale (fp16 GradScaler)", "scale", True),
        ("learning rate", "lr", False),
        ("validation mAP@0.5", "mAP@0.5", False),
        ("skipped optimizer steps", "steps", False),
    )
    for axis, (axis_title, ylabel, log) in zip(axes, titles, strict=True):
        axis.set_title(axis_title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        if log and any(line.get_ydata().size for line in axis.get_lines()):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        handles, _labels = axis.get_legend_handles_labels()
        if handles:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_run(run: RunMetrics, path: Path) -> Path:
    """One figure: losses, grad norm before/after clipping with the clip threshold, loss
    scale, lr, val mAP and skipped steps (red lines on the per-step panels; the explained
    ones dashed black on the loss panel)."""
    return _figure([("", run)], str(run.path.parent), path)


def plot_comparison(
    run_a: RunMetrics, run_b: RunMetrics, names: tuple[str, str], path: Path
) -> Path:
    """The same panels with run B dashed over run A."""
    return _figure(
        [(names[0], run_a), (names[1], run_b)], f"{names[0]} (solid) vs {names[1]} (dashed)", path
    )
