"""CPU benchmark of the fused DFL kernel against eager PyTorch and torch.compile.

Times forward and forward+backward of one DFL call as a detector makes it
(``pred [M, 4 * 16]``, ``target [M, 4]``, a weight per anchor, mean reduction) for
N = 4 * M rows, in fp32 and bf16, for these providers, all in the same run:

- ``stable_dfl``: the fused C++ kernel (``backend='cpu'``);
- ``reference``: the eager PyTorch specification (``backend='reference'``);
- ``ultralytics``: ultralytics-style eager DFL (two ``F.cross_entropy`` calls, mean over sides);
- ``compiled_reference``: ``torch.compile`` of the reference;
- ``memory_floor``: one read of the logits and one write of a new gradient-sized tensor
  (``pred.clone()``), the least any fwd+bwd must do; ``copy_prealloc`` does the same into a
  buffer allocated once (no page faults), for scale.

Medians and 20/80% quantiles over repeats; speedups are against ``reference`` in the same run.
Peak extra memory of one fwd+bwd is measured per provider in a fresh process (peak RSS growth).
Results are appended to ``bench/results/dfl_cpu.csv``; the run's rows go to
``bench/results/dfl_cpu.json`` and a plot to ``bench/results/dfl_cpu.png``.

Usage: ``python bench/bench_dfl.py [--quick] [--sizes N ...] [--stem NAME]``; the CPU kernel level
is the one in use (``ATEN_CPU_CAPABILITY=default|avx2|avx512`` forces a lower one) and is recorded
in each row's ``device``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch
from common import N_BINS

from stable_dfl import stable_dfl_loss

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
LOSS_PROVIDERS = PROVIDERS[:4]


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
        return pred.clone
    if provider == "copy_prealloc":
        out = torch.empty_like(pred)
        return lambda: out.copy_(pred)
    return common.loss_step(make_loss_fn(provider), mode, pred, target, weight)


def time_ms(
    step: Callable[[], object], min_repeats: int, budget_s: float
) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles in ms after two warm-up calls."""
    step()
    step()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_repeats or (
        time.perf_counter() - start < budget_s and len(samples) < 50
    ):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    quantiles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), quantiles[1], quantiles[7]


def peak_extra_memory_mb(provider: str, n_rows: int, dtype_name: str) -> float:
    """Peak RSS growth of one fwd+bwd after the inputs exist, measured in a fresh process
    (Linux: the high-water mark is reset through /proc/self/clear_refs just before the step;
    importing torch alone peaks higher than the step, which would hide it)."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import bench_dfl as b\n"
        "def status_kb(field):\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) for l in f if l.startswith(field))\n"
        "pred, target, weight = b.make_inputs(int(sys.argv[3]), b.DTYPES[sys.argv[4]])\n"
        "step = b.make_step(sys.argv[2], 'forward_backward', pred, target, weight)\n"
        "before = status_kb('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "step()\n"
        "print((status_kb('VmHWM') - before) / 1024)\n"
    )
    if provider == "compiled_reference":
        return float("nan")  # compiling allocates far more than the kernel it produces
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), provider, str(n_rows), dtype_name],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def run(sizes, repeats: int, budget_s: float) -> list[dict]:
    meta = common.run_metadata(common.cpu_description())
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for n_rows in sizes:
            pred, target, weight = make_inputs(n_rows, dtype)
            for mode in ("forward", "forward_backward"):
                for provider in PROVIDERS:
                    if mode == "forward" and provider in ("memory_floor", "copy_prealloc"):
                        continue
                    step = make_step(provider, mode, pred, target, weight)
                    ys = time_ms(step, repeats, budget_s)
                    rows.append(
                        common.result_row(
                            "dfl", provider, mode, "time_ms", dtype_name, n_rows, *ys, meta
                        )
                    )
                    print(
                        f"{dtype_name} N={n_rows:>9} {mode:<16} {provider:<18} {ys[0]:9.2f} ms",
                        flush=True,
                    )
    return rows


def memory_rows(n_rows: int) -> list[dict]:
    meta = common.run_metadata(common.cpu_description())
    rows = []
    for provider in ("stable_dfl", "reference", "ultralytics", "memory_floor"):
        mb = peak_extra_memory_mb(provider, n_rows, "fp32")
        rows.append(
            common.result_row(
                "dfl",
                provider,
                "forward_backward",
                "peak_extra_mb",
                "fp32",
                n_rows,
                mb,
                mb,
                mb,
                meta,
                digits=1,
            )
        )
        print(f"fp32 N={n_rows} peak extra memory {provider:<14} {mb:8.1f} MB", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    times = {
        (r["dtype"], r["x"], r["mode"], r["provider"]): r["y50"]
        for r in rows
        if r["metric"] == "time_ms"
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
    if memory:
        lines.append("")
        lines.append(
            f"Peak extra memory of one fwd+bwd, fp32, N = {memory[0]['x']:,} (peak RSS growth): "
            + ", ".join(f"{r['provider']} {r['y50']} MB" for r in memory)
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES), figsize=(12, 4.5), sharey=True)
    for ax, dtype in zip(axes, DTYPES, strict=True):
        common.plot_quantile_lines(
            ax, rows, PROVIDERS, lambda _: "forward_backward", metric="time_ms", dtype=dtype
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats (a smoke run)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help=f"rows N to time (default: {', '.join(map(str, SIZES))})",
    )
    parser.add_argument(
        "--stem",
        help="name of the results files in bench/results/ (default: dfl_cpu, dfl_cpu_quick); "
        "e.g. one per CPU level forced with ATEN_CPU_CAPABILITY",
    )
    args = parser.parse_args()
    sizes = args.sizes or (SIZES[:2] if args.quick else SIZES)
    rows = run(sizes, repeats=3 if args.quick else 7, budget_s=0.5 if args.quick else 3.0)
    if not args.quick and args.sizes is None:
        rows += memory_rows(537_600)
    stem = args.stem or ("dfl_cpu_quick" if args.quick else "dfl_cpu")
    print(common.write_results(rows, stem, plot, summary))


if __name__ == "__main__":
    main()
