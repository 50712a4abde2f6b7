"""CPU benchmark of the fused DFL kernel against eager PyTorch and torch.compile.

One DFL call as a detector makes it (``pred [M, 4 * 16]``, ``target [M, 4]``, a weight per
anchor, mean reduction) for N = 4 * M rows, in fp32 and bf16, forward and forward+backward, for
these providers, all in the same run:

- ``stable_dfl``: the fused C++ kernel (``backend='cpu'``);
- ``reference``: the eager PyTorch specification (``backend='reference'``);
- ``ultralytics``: ultralytics-style eager DFL (two ``F.cross_entropy`` calls, mean over sides);
- ``compiled_reference``: ``torch.compile`` of the reference;
- ``memory_floor``: one read of the logits and one write of a new gradient-sized tensor
  (``pred.clone()``), the least any fwd+bwd must do; for the forward, one read of the logits
  (``pred.sum()``); ``copy_prealloc`` does the fwd+bwd floor's copy into a buffer allocated
  once (no page faults), for scale.

The timing is pytest-benchmark's (``bench/test_dfl_cpu.py``, which also times the masked call
at 10% foreground and measures peak extra memory); this script runs that suite ``RUNS`` times
(``--runs``) and merges the runs, each case's rounds those of every run
(``common.merge_benchmark_runs``), then renders the JSON: rows appended to
``bench/results/<stem>.csv``, the run's rows to ``<stem>.json``, tables to ``<stem>.md`` (README's
tables are generated from it: ``bench/readme_tables.py``) and a plot to ``<stem>.png``. Medians
and 20/80% quantiles over rounds; ratios against the other providers of the same run.

Usage: ``python bench/bench_dfl.py [--quick] [--runs K] [--stem NAME] [-k EXPR]`` or
``--from_json FILE`` (render a suite run made with ``pytest bench/test_dfl_cpu.py
--benchmark-only --benchmark-json=FILE --benchmark-save-data``). The CPU kernel level is the one
in use (``ATEN_CPU_CAPABILITY=default|avx2|avx512`` forces a lower one) and is recorded in each
row's ``device``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import common
import torch
from common import N_BINS

from stable_dfl import stable_dfl_loss

nan = float("nan")
SIZES = (6_400, 64_000, 537_600, 2_000_000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = (
    "stable_dfl",
    "reference",
    "ultralytics",
    "compiled_reference",
    "memory_floor",
    "copy_prealloc",
)
MEMORY_PROVIDERS = ("stable_dfl", "reference", "ultralytics", "memory_floor")
MEMORY_ROWS = 537_600
#: Runs of the suite each case's median is over: the goals compare providers timed seconds
#: apart, and one run can catch a slow phase of a shared machine on one of them.
RUNS = 3
MASKED_PROVIDERS = (
    "stable_dfl_mask",
    "stable_dfl_indexed",
    "ultralytics_indexed",
    "stable_dfl_all_anchors",
    "zero_grad_floor",
)


def make_loss_fn(
    provider: str,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if provider == "ultralytics":
        return common.ultralytics_style_dfl
    backend = {"stable_dfl": "cpu", "reference": "reference", "compiled_reference": "reference"}[
        provider
    ]

    def loss_fn(pred, target, weight):
        return stable_dfl_loss(
            pred, target, weight, avg_factor=weight.sum().clamp(min=1), backend=backend
        )

    if provider == "compiled_reference":
        return torch.compile(loss_fn, dynamic=False)
    return loss_fn


def make_inputs(n_rows: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    anchors = n_rows // 4
    pred = (torch.randn(anchors, 4 * N_BINS, generator=generator) * 3).to(dtype)
    target = torch.rand(anchors, 4, generator=generator) * (N_BINS - 1)
    weight = torch.rand(anchors, 1, generator=generator)
    return pred, target, weight


def make_step(provider: str, mode: str, pred, target, weight) -> Callable[[], object]:
    if provider == "memory_floor":
        return pred.clone if mode == "forward_backward" else pred.sum
    if provider == "copy_prealloc":
        out = torch.empty_like(pred)
        return lambda: out.copy_(pred)
    return common.loss_step(make_loss_fn(provider), mode, pred, target, weight)


# One measurement gives both metrics, which the suite records as two cases.
@functools.cache
def extra_memory_mb(provider: str, n_rows: int, dtype_name: str) -> dict[str, float]:
    """RSS growth of one fwd+bwd after the inputs exist, measured in a fresh process:
    ``peak_extra_mb`` at its peak (Linux: the high-water mark is reset through
    /proc/self/clear_refs just before the step; importing torch alone peaks higher than the
    step, which would hide it) and ``held_mb`` once the step and its gradient are gone (what
    stays mapped until the next step: stable_dfl keeps its gradient's block for reuse). The
    provider first runs once on a small input, as a training loop has by its second step: the
    first call of an op faults in its code pages (about 5 MB for the compiled DFL), which is
    not memory of the step."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import bench_dfl as b\n"
        "def status_kb(field):\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) for l in f if l.startswith(field))\n"
        "b.make_step(sys.argv[2], 'forward_backward', *b.make_inputs(4096, b.DTYPES[sys.argv[4]]))()\n"
        "pred, target, weight = b.make_inputs(int(sys.argv[3]), b.DTYPES[sys.argv[4]])\n"
        "step = b.make_step(sys.argv[2], 'forward_backward', pred, target, weight)\n"
        "before = status_kb('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "step()\n"
        "print((status_kb('VmHWM') - before) / 1024, (status_kb('VmRSS') - before) / 1024)\n"
    )
    if provider == "compiled_reference":  # compiling allocates far more than the kernel it produces
        return {"peak_extra_mb": float("nan"), "held_mb": float("nan")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), provider, str(n_rows), dtype_name],
        capture_output=True,
        text=True,
        check=True,
    )
    peak, held = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return {"peak_extra_mb": peak, "held_mb": max(held, 0.0)}


def summary(rows: list[dict]) -> str:
    times = {
        (r["dtype"], r["x"], r["mode"], r["provider"]): r["y50"]
        for r in rows
        if r["metric"] == "time_ms" and r["kernel"] == "dfl"
    }
    lines = [
        "| dtype | N rows | mode | stable_dfl ms | reference ms | ultralytics ms | compiled ms | floor ms "
        "| x vs reference | x vs compiled | / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, n_rows, mode, provider in sorted(times, key=lambda k: (k[0], k[1], k[2])):
        if provider != "stable_dfl":
            continue
        t = {p: times.get((dtype, n_rows, mode, p), float("nan")) for p in PROVIDERS}
        ours = t["stable_dfl"]
        lines.append(
            f"| {dtype} | {n_rows:,} | {mode} | {ours:.2f} | {t['reference']:.2f} | {t['ultralytics']:.2f} "
            f"| {t['compiled_reference']:.2f} | {t['memory_floor']:.2f} | {t['reference'] / ours:.1f} "
            f"| {t['compiled_reference'] / ours:.1f} | {ours / t['memory_floor']:.2f} |"
        )
    memory = [r for r in rows if r["metric"] == "peak_extra_mb"]
    held = [r for r in rows if r["metric"] == "held_mb"]
    if memory:
        lines.append("")
        lines.append(
            f"Peak extra memory of one fwd+bwd, fp32, N = {memory[0]['x']:,} (peak RSS growth): "
            + ", ".join(f"{r['provider']} {r['y50']} MB" for r in memory)
            + (
                "; held once the step's tensors are gone, until the next step: "
                + ", ".join(f"{r['provider']} {r['y50']} MB" for r in held)
                if held
                else ""
            )
        )
    lines += ["", *goals(rows)]
    masked = {
        (r["dtype"], r["x"], r["provider"]): r["y50"]
        for r in rows
        if r["metric"] == "time_ms" and r["kernel"] == "dfl_masked"
    }
    if masked:
        lines += [
            "",
            "| dtype | anchors (x 4 sides) | fwd+bwd ms: " + " | ".join(MASKED_PROVIDERS) + " |",
            "|---|---|" + "---|" * len(MASKED_PROVIDERS),
        ]
        for dtype, anchors in sorted({(d, x) for d, x, _ in masked}):
            cells = [
                f"{masked.get((dtype, anchors, p), float('nan')):.2f}" for p in MASKED_PROVIDERS
            ]
            lines.append(f"| {dtype} | {anchors:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The goals at N >= GOAL_ROWS: (what, the ratio's numerator and denominator, bound, "<=" or ">=").
GOAL_ROWS = 537_600
GOALS = (
    ("fwd+bwd / memory floor", ("forward_backward", "stable_dfl", "memory_floor"), 1.3, "<="),
    ("fwd+bwd, x eager reference", ("forward_backward", "reference", "stable_dfl"), 10.0, ">="),
    (
        "fwd+bwd, x torch.compile",
        ("forward_backward", "compiled_reference", "stable_dfl"),
        4.0,
        ">=",
    ),
    ("forward, x eager reference", ("forward", "reference", "stable_dfl"), 20.0, ">="),
)


def goals(rows: list[dict]) -> list[str]:
    """A table of the goals at N >= GOAL_ROWS: each ratio, its bound and whether it holds."""
    times = {
        (r["dtype"], r["x"], r["mode"], r["provider"]): r["y50"]
        for r in rows
        if r["metric"] == "time_ms" and r["kernel"] == "dfl"
    }
    cases = sorted({(d, x) for d, x, _, _ in times if x >= GOAL_ROWS})
    if not cases:
        return []
    lines = [
        "| goal | " + " | ".join(f"{d} {x:,}" for d, x in cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for name, (mode, top, bottom), bound, sense in GOALS:
        cells = []
        for dtype, x in cases:
            ratio = times.get((dtype, x, mode, top), nan) / times.get((dtype, x, mode, bottom), nan)
            met = ratio <= bound if sense == "<=" else ratio >= bound
            cells.append(f"{ratio:.2f} {'met' if met else 'missed'}")
        lines.append(f"| {name} {sense} {bound:g} | " + " | ".join(cells) + " |")
    memory = {r["provider"]: r["y50"] for r in rows if r["metric"] == "peak_extra_mb"}
    if "stable_dfl" in memory and "memory_floor" in memory:
        ratio = memory["stable_dfl"] / memory["memory_floor"]
        lines.append(
            f"| peak extra memory / floor's <= 1.2 (fp32 {MEMORY_ROWS:,}) | {ratio:.2f} "
            f"{'met' if ratio <= 1.2 else 'missed'} |" + " |" * (len(cases) - 1)
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES), figsize=(12, 4.5), sharey=True)
    for ax, dtype in zip(axes, DTYPES, strict=True):
        common.plot_quantile_lines(
            ax,
            rows,
            PROVIDERS,
            lambda _: "forward_backward",
            metric="time_ms",
            kernel="dfl",
            dtype=dtype,
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="rows N (= 4 x anchors)",
            title=f"DFL fwd+bwd, {dtype}, CPU",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend()
    fig.suptitle(
        rows[0]["device"] + f", torch {rows[0]['torch']}, commit {rows[0]['commit']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    common.suite_main(
        __doc__.split("\n")[0],
        "test_dfl_cpu.py",
        "dfl_cpu",
        plot,
        summary,
        "; e.g. one per CPU level forced with ATEN_CPU_CAPABILITY",
        default_runs=RUNS,
    )


if __name__ == "__main__":
    main()
