"""What a whole step gains from the fused DFL and the guard (``bench/test_step.py``).

Runs the suite under pytest-benchmark and renders its JSON: rows appended to
``bench/results/<stem>.csv``, the run's rows to ``<stem>.json``, tables to ``<stem>.md`` (README's
are generated from it) and a bar plot to ``<stem>.png``.

Usage: ``python bench/bench_step.py [--quick] [--stem NAME] [-k EXPR]`` or ``--from_json FILE``.
"""

from __future__ import annotations

from pathlib import Path

import common

DETECTOR_PROVIDERS = ("fused_dfl+guard", "eager_dfl+clip", "fused_dfl+clip", "eager_dfl+guard")


def _times(rows: list[dict]) -> dict[tuple[str, int, str], float]:
    return {(r["kernel"], r["x"], r["provider"]): r["y50"] for r in rows}


def summary(rows: list[dict]) -> str:
    t = _times(rows)
    nan = float("nan")
    lines = []
    for size in sorted({x for kernel, x, _ in t if kernel == "v8_detection_loss"}):
        before, after = (
            t.get(("v8_detection_loss", size, p), nan) for p in ("unpatched", "patched")
        )
        dfl_before, dfl_after = (
            t.get(("v8_dfl_alone", size, p), nan) for p in ("unpatched", "patched")
        )
        lines += [
            f"ultralytics `v8DetectionLoss` forward + backward, batch 8, {size} px:",
            "",
            "| | unpatched | patched | speed-up |",
            "|---|---|---|---|",
            f"| whole loss, ms | {before:.2f} | {after:.2f} | {before / after:.2f}x |",
            f"| its DFL alone, ms | {dfl_before:.2f} | {dfl_after:.2f} | {dfl_before / dfl_after:.2f}x |",
            f"| DFL share of the loss | {dfl_before / before:.1%} | {dfl_after / after:.1%} | |",
        ]
        errors = {
            r["provider"]: (r["y50"], r["dtype"])
            for r in rows
            if r["kernel"] == "v8_dfl_bf16_autocast_error" and r["x"] == size
        }
        if errors:
            (theirs, dtype), (ours, _) = errors["unpatched"], errors["patched"]
            lines.append(
                f"| DFL largest error vs float64 under CPU bf16 autocast ({dtype} logits) "
                f"| {theirs:.2e} | {ours:.2e} | |"
            )
        lines.append("")
    for size in sorted({x for kernel, x, _ in t if kernel == "detector_step"}):
        step = {p: t.get(("detector_step", size, p), nan) for p in DETECTOR_PROVIDERS}
        dfl = {
            p: t.get(("detector_dfl_alone", size, p), nan)
            for p in ("fused_dfl+guard", "eager_dfl+clip")
        }
        ours, baseline = step["fused_dfl+guard"], step["eager_dfl+clip"]
        alone = {
            p: t.get(("detector_optimizer_step", size, p), nan)
            for p in ("guard", "plain_clip", "grad_refresh")
        }
        guard_ms = alone["guard"] - alone["grad_refresh"]
        clip_ms = alone["plain_clip"] - alone["grad_refresh"]
        dtype = next(r["dtype"] for r in rows if r["kernel"] == "detector_step" and r["x"] == size)
        lines += [
            f"Dual-head detector, one training step (batch 8, {size} px, {dtype} autocast or full):",
            "",
            "| | fused DFL + guard | eager DFL + plain clip | fused DFL + plain clip | eager DFL + guard |",
            "|---|---|---|---|---|",
            "| step, ms | " + " | ".join(f"{step[p]:.1f}" for p in DETECTOR_PROVIDERS) + " |",
            f"| DFL alone, ms | {dfl['fused_dfl+guard']:.2f} | {dfl['eager_dfl+clip']:.2f} | | |",
            f"| DFL share of the step | {dfl['fused_dfl+guard'] / ours:.1%} "
            f"| {dfl['eager_dfl+clip'] / baseline:.1%} | | |",
            f"| optimizer step alone (check, clip, AdamW), ms | {guard_ms:.2f} | {clip_ms:.2f} | | |",
            f"| its share of the step | {guard_ms / ours:.1%} | {clip_ms / baseline:.1%} | | |",
            "",
            f"Whole step: {baseline / ours:.3f}x the speed of the eager DFL with the plain clip "
            f"step (fused DFL + guard {ours:.1f} ms, eager + clip {baseline:.1f} ms).",
            "",
        ]
    lines += _forensics_summary(rows, t)
    return "\n".join(lines).rstrip("\n")


def _forensics_summary(rows: list[dict], t: dict[tuple[str, int, str], float]) -> list[str]:
    nan = float("nan")
    off = t.get(("detector_step_forensics", 64, "forensics_off"), nan)
    ratio = t.get(("detector_step_forensics", 64, "on_over_off_interleaved"), nan)
    replays = {r["provider"]: r["y50"] for r in rows if r["kernel"] == "skipped_step_replay"}
    if not replays and off != off:
        return []
    dtype = next(
        r["dtype"]
        for r in rows
        if r["kernel"] in ("detector_step_forensics", "skipped_step_replay")
    )
    lines = [
        f"Forensics of a skipped step (dual-head detector, batch 8, 64 px, {dtype} autocast or full):",
        "",
        "| | ms | in steps |",
        "|---|---|---|",
        f"| step taken, forensics off | {off:.1f} | 1 |",
        f"| step taken, forensics on / off (steps alternating, median ratio) | | {ratio:.3f} |",
    ]
    labels = {
        "nan_label": "replay of a skipped step: corrupt label (loss origin, batch bisected)",
        "nan_image": "replay of a skipped step: NaN pixel (input origin)",
    }
    for provider, label in labels.items():
        if provider in replays:
            lines.append(f"| {label} | {replays[provider]:.1f} | {replays[provider] / off:.1f} |")
    return [*lines, ""]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["kernel"], r["x"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.8), squeeze=False)
    for ax, (kernel, x) in zip(axes[0], groups, strict=True):
        chosen = [r for r in rows if (r["kernel"], r["x"]) == (kernel, x)]
        ax.bar(
            [r["provider"] for r in chosen],
            [r["y50"] for r in chosen],
            yerr=[
                [r["y50"] - r["y20"] for r in chosen],
                [r["y80"] - r["y50"] for r in chosen],
            ],
        )
        ax.set_title(f"{kernel}, {x} px", fontsize=9)
        ax.set_ylabel("median ms")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(
        rows[0]["device"] + f", torch {rows[0]['torch']}, commit {rows[0]['commit']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    common.suite_main(__doc__.split("\n")[0], "test_step.py", "step_cpu", plot, summary)


if __name__ == "__main__":
    main()
