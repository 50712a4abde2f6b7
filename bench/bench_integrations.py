"""CPU benchmark of the ultralytics drop-in: ultralytics' own ``DFLoss`` against ours.

Times one DFL call as ultralytics' ``BboxLoss`` makes it, for ``M = N / 4`` foreground
anchors: ``dfl(pred_dist [N, 16], target [M, 4]) * weight``, summed and divided by the
weight sum, forward and forward+backward, in fp32 and bf16 logits, for

- ``ultralytics``: ``ultralytics.utils.loss.DFLoss`` as installed (skipped when ultralytics
  is not importable);
- ``stable_dfl``: :class:`stable_dfl.integrations.ultralytics.DFLoss` (the fused kernel),

side by side in the same run. bf16 logits go in as they are, without autocast: ultralytics
then computes its log-softmax in bf16 (CPU autocast does not upcast it), ours in fp32.

The providers are timed interleaved (one call of each per round, the order alternating) so
that load from other processes on a shared machine hits both alike; medians and 20/80%
quantiles over rounds. ``--threads 1`` avoids the stalls that a busy machine causes in
multi-threaded kernels (a thread descheduled at a barrier). Results are
appended to ``bench/results/integrations_cpu.csv``; the run's rows go to
``bench/results/integrations_cpu.json``, a table to ``.md`` and a plot to ``.png``.

Usage: ``python bench/bench_integrations.py [--quick] [--threads N]`` with stable_dfl importable.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    N_BINS,
    cpu_description,
    loss_step,
    result_row,
    run_header,
    run_metadata,
    write_results,
)

from stable_dfl.integrations import ultralytics as stable_ultralytics

SIZES = (64_000, 537_600)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("ultralytics", "stable_dfl")
MODES = ("forward", "forward_backward")
STEM = "integrations_cpu"
KERNEL = "dfl_ultralytics_dropin"


def ultralytics_loss_module():
    """``ultralytics.utils.loss``, or None when ultralytics is not importable."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # skips its DNS probe at import
    try:
        return importlib.import_module("ultralytics.utils.loss")
    except ImportError as error:
        print(f"ultralytics is not importable ({error}): timing stable_dfl only")
        return None


def make_inputs(n_rows: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    anchors = n_rows // 4
    pred_dist = (torch.randn(n_rows, N_BINS, generator=generator) * 3).to(dtype)
    target = torch.rand(anchors, 4, generator=generator) * (N_BINS - 1)
    weight = torch.rand(anchors, 1, generator=generator)
    return pred_dist, target, weight


def make_step(dfl: torch.nn.Module, mode: str, pred_dist, target, weight) -> Callable[[], object]:
    weight_sum = weight.sum()

    def bbox_dfl(logits):
        return (dfl(logits, target) * weight).sum() / weight_sum

    return loss_step(bbox_dfl, mode, pred_dist)


def time_interleaved(
    steps: dict[str, Callable[[], object]], min_rounds: int, budget_s: float
) -> dict[str, tuple[float, float, float]]:
    """Median, 20% and 80% quantiles in ms per step, after two warm-up calls of each."""
    for step in steps.values():
        step()
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 50):
        for name in order if rounds % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            steps[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    result = {}
    for name, times in samples.items():
        quantiles = statistics.quantiles(times, n=10, method="inclusive")
        result[name] = (statistics.median(times), quantiles[1], quantiles[7])
    return result


def run(sizes, repeats: int, budget_s: float) -> list[dict]:
    loss_module = ultralytics_loss_module()
    losses = {"stable_dfl": stable_ultralytics.DFLoss(N_BINS)}
    ultralytics_version = "not installed"
    if loss_module is not None:
        losses["ultralytics"] = loss_module.DFLoss(N_BINS)
        ultralytics_version = importlib.import_module("ultralytics").__version__
    meta = run_metadata(cpu_description(), ultralytics=ultralytics_version)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for n_rows in sizes:
            pred_dist, target, weight = make_inputs(n_rows, dtype)
            for mode in MODES:
                steps = {
                    provider: make_step(losses[provider], mode, pred_dist, target, weight)
                    for provider in PROVIDERS
                    if provider in losses
                }
                for provider, (y50, y20, y80) in time_interleaved(steps, repeats, budget_s).items():
                    rows.append(
                        result_row(
                            KERNEL,
                            provider,
                            mode,
                            "time_ms",
                            dtype_name,
                            n_rows,
                            y50,
                            y20,
                            y80,
                            meta,
                        )
                    )
                    print(
                        f"{dtype_name} N={n_rows:>9} {mode:<16} {provider:<12} {y50:9.2f} ms",
                        flush=True,
                    )
    return rows


def summary(rows: list[dict]) -> str:
    times = {(r["dtype"], r["x"], r["mode"], r["provider"]): r for r in rows}
    lines = [
        "| dtype | N rows (M anchors) | mode | ultralytics ms (p20-p80) | stable_dfl ms (p20-p80) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, n_rows, mode in sorted({k[:3] for k in times}):
        cells = []
        for provider in PROVIDERS:
            r = times.get((dtype, n_rows, mode, provider))
            cells.append(f"{r['y50']:.2f} ({r['y20']:.2f}-{r['y80']:.2f})" if r else "n/a")
        theirs = times.get((dtype, n_rows, mode, "ultralytics"))
        ours = times[(dtype, n_rows, mode, "stable_dfl")]
        speedup = f"{theirs['y50'] / ours['y50']:.1f}x" if theirs else "n/a"
        lines.append(
            f"| {dtype} | {n_rows:,} ({n_rows // 4:,}) | {mode} | {cells[0]} | {cells[1]} | {speedup} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["x"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(DTYPES), figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(PROVIDERS)
    for ax, dtype in zip(axes, DTYPES, strict=True):
        for i, provider in enumerate(PROVIDERS):
            by_group = {
                (r["x"], r["mode"]): r
                for r in rows
                if r["dtype"] == dtype and r["provider"] == provider
            }
            xs = [g for g, key in enumerate(groups) if key in by_group]
            if not xs:
                continue
            found = [by_group[groups[g]] for g in xs]
            medians = [r["y50"] for r in found]
            spread = [
                [r["y50"] - r["y20"] for r in found],
                [r["y80"] - r["y50"] for r in found],
            ]
            ax.bar([x + i * width for x in xs], medians, width, yerr=spread, label=provider)
        ax.set_xticks(
            [g + width * (len(PROVIDERS) - 1) / 2 for g in range(len(groups))],
            [f"N={n:,}\n{mode.replace('_', '+')}" for n, mode in groups],
            fontsize=8,
        )
        ax.set(yscale="log", title=f"ultralytics DFLoss vs drop-in, {dtype}, CPU")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms), p20-p80 bars")
    axes[0].legend()
    first = rows[0]
    fig.suptitle(
        f"{first['device']}, torch {first['torch']}, ultralytics {first['ultralytics']}, "
        f"commit {first['commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest size, few repeats")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SIZES[:1] if args.quick else SIZES
    rows = run(sizes, repeats=3 if args.quick else 9, budget_s=0.5 if args.quick else 3.0)
    stem = STEM + ("_quick" if args.quick else "")
    header = f"ultralytics {rows[0]['ultralytics']}, {run_header(rows)}"
    print(write_results(rows, stem, plot, summary, header))


if __name__ == "__main__":
    main()
