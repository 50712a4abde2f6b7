"""GPU benchmark of the fused DFL kernels (CUDA C++ and Triton) against eager PyTorch and
torch.compile.

Times forward and forward+backward of one DFL call as a detector makes it
(``pred [M, 4 * 16]``, ``target [M, 4]``, a weight per anchor, mean reduction) for
N = 4 * M rows, in fp32, fp16 and bf16, for these providers, all in the same run:

- ``cuda``: the compiled CUDA kernel (``backend='cuda'``);
- ``triton``: the Triton kernel (``backend='triton'``);
- ``reference``: the eager PyTorch specification (``backend='reference'``);
- ``ultralytics``: ultralytics-style eager DFL (two ``F.cross_entropy`` calls, mean over sides);
- ``compiled_reference``: ``torch.compile`` of the reference;
- ``copy``: a device-to-device copy of the logits into a preallocated buffer, the bandwidth
  yardstick.

Times are CUDA-event medians with 20%/80% quantiles. Achieved bandwidth counts the bytes a
fused kernel must move: logits and targets read once, plus the gradient written once for
forward+backward (the copy: logits read and written once). Peak extra memory is the growth of
``torch.cuda.max_memory_allocated`` during one call, inputs excluded. Each provider's loss is
checked against the reference before it is timed.

Results are appended to ``bench/results/dfl_gpu.csv``; the run's rows go to
``bench/results/dfl_gpu.json``, a plot to ``dfl_gpu.png`` and a table to ``dfl_gpu.md``, with
the card, torch version and git commit.

Usage: ``python bench/bench_dfl_gpu.py [--quick]``. Without a GPU, ``--dry-run`` runs the same
code on CPU tensors at small sizes (Triton interpreted, the CUDA provider skipped) and writes
into a temporary directory: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch
from common import N_BINS

SIZES = (6_400, 64_000, 640_000, 2_000_000, 8_000_000)
QUICK_SIZES = (64_000, 2_000_000)
DRY_RUN_SIZES = (256, 1_024)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOSS_PROVIDERS = ("cuda", "triton", "reference", "ultralytics", "compiled_reference")
PROVIDERS = (*LOSS_PROVIDERS, "copy")
MODES = ("forward", "forward_backward")
BACKEND_OF = {
    "cuda": "cuda",
    "triton": "triton",
    "reference": "reference",
    "compiled_reference": "reference",
}

Step = Callable[[], object]


def make_loss_fns() -> dict[
    str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
]:
    """One loss function per provider; the compiled one is shared by all sizes (dynamic shapes)."""
    from stable_dfl import stable_dfl_loss

    def with_backend(backend: str):
        def loss_fn(pred, target, weight):
            # No loss cap, like ultralytics (whose loss is this one / 4, without the eps floor).
            avg_factor = weight.sum().clamp(min=1)
            return stable_dfl_loss(
                pred, target, weight, avg_factor=avg_factor, max_loss=None, backend=backend
            )

        return loss_fn

    fns = {provider: with_backend(backend) for provider, backend in BACKEND_OF.items()}
    fns["compiled_reference"] = torch.compile(fns["compiled_reference"], dynamic=True)
    fns["ultralytics"] = common.ultralytics_style_dfl
    return fns


def unavailable_reason(provider: str, device: torch.device) -> str | None:
    """Why a provider cannot run on this device, or None."""
    if provider not in BACKEND_OF:
        return None
    from stable_dfl.ops import backends

    return backends.unavailable_reason(BACKEND_OF[provider], device)


def make_inputs(n_rows: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    anchors = n_rows // 4
    pred = (torch.randn(anchors, 4 * N_BINS, generator=generator) * 3).to(device, dtype)
    target = (torch.rand(anchors, 4, generator=generator) * (N_BINS - 1)).to(device)
    weight = torch.rand(anchors, 1, generator=generator).to(device)
    return pred, target, weight


def make_step(provider: str, mode: str, loss_fn, pred, target, weight) -> Step:
    if provider == "copy":
        out = torch.empty_like(pred)
        return lambda: out.copy_(pred)
    return common.loss_step(loss_fn, mode, pred, target, weight)


def bytes_moved(provider: str, mode: str, pred: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes a fused kernel must move (the copy: logits read and written once)."""
    logits = pred.numel() * pred.element_size()
    if provider == "copy":
        return 2 * logits
    targets = target.numel() * target.element_size()
    return logits + targets + (logits if mode == "forward_backward" else 0)


def time_ms(step: Step, device: torch.device, min_repeats: int, budget_s: float):
    """Median, 20% and 80% quantiles in ms after warm-up; CUDA events on a GPU."""
    for _ in range(3):
        step()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_repeats or (
        time.perf_counter() - start < budget_s and len(samples) < 100
    ):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    quantiles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), quantiles[1], quantiles[7]


def peak_extra_mb(step: Step, device: torch.device) -> float:
    """Growth of the CUDA allocator's peak during one call, over what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def check_loss(provider: str, loss_fn, reference_fn, pred, target, weight) -> None:
    """A stable_dfl backend must agree with the reference before its time means anything."""
    got, want = loss_fn(pred, target, weight).float(), reference_fn(pred, target, weight).float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise AssertionError(
            f"{provider}: loss {got.item()} differs from the reference {want.item()}"
        )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU (dry run, {torch.get_num_threads()} threads)"


def run(device: torch.device, sizes, dtypes, min_repeats: int, budget_s: float) -> list[dict]:
    meta = common.run_metadata(device_name(device))
    fns = make_loss_fns()
    providers = []
    for provider in PROVIDERS:
        reason = unavailable_reason(provider, device)
        if reason is None:
            providers.append(provider)
        else:
            print(f"skipping {provider}: {reason}", flush=True)
    rows = []

    def record(provider, mode, metric, dtype_name, n_rows, y50, y20, y80):
        rows.append(
            common.result_row(
                "dfl", provider, mode, metric, dtype_name, n_rows, y50, y20, y80, meta
            )
        )

    for dtype_name in dtypes:
        for n_rows in sizes:
            pred, target, weight = make_inputs(n_rows, DTYPES[dtype_name], device)
            for provider in providers:
                if provider in BACKEND_OF:
                    check_loss(provider, fns[provider], fns["reference"], pred, target, weight)
            for mode in MODES:
                for provider in providers:
                    if provider == "copy" and mode == "forward_backward":
                        continue
                    step = make_step(provider, mode, fns.get(provider), pred, target, weight)
                    y50, y20, y80 = time_ms(step, device, min_repeats, budget_s)
                    record(provider, mode, "time_ms", dtype_name, n_rows, y50, y20, y80)
                    moved = bytes_moved(provider, mode, pred, target)
                    gbps = [moved / (t * 1e-3) / 1e9 for t in (y50, y80, y20)]
                    record(provider, mode, "gbps", dtype_name, n_rows, *gbps)
                    mb = peak_extra_mb(step, device)
                    record(provider, mode, "peak_extra_mb", dtype_name, n_rows, mb, mb, mb)
                    print(
                        f"{dtype_name} N={n_rows:>9} {mode:<16} {provider:<18} {y50:9.3f} ms "
                        f"{gbps[0]:8.1f} GB/s {mb:9.1f} MB",
                        flush=True,
                    )
            del pred, target, weight
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> str:
    """Markdown table: times of every provider, the fused kernels' bandwidth against the copy's."""
    value = {(r["metric"], r["dtype"], r["x"], r["mode"], r["provider"]): r["y50"] for r in rows}
    keys = sorted({(r["dtype"], r["x"], r["mode"]) for r in rows})
    head = " | ".join(f"{p} ms" for p in LOSS_PROVIDERS)
    lines = [
        f"| dtype | N rows | mode | {head} | cuda GB/s | triton GB/s | copy GB/s "
        "| cuda % of copy | x vs reference |",
        "|---|---|---|" + "---|" * (len(LOSS_PROVIDERS) + 5),
    ]
    nan = float("nan")
    for dtype, n_rows, mode in keys:
        times = [value.get(("time_ms", dtype, n_rows, mode, p), nan) for p in LOSS_PROVIDERS]
        gbps = [value.get(("gbps", dtype, n_rows, mode, p), nan) for p in ("cuda", "triton")] + [
            value.get(("gbps", dtype, n_rows, "forward", "copy"), nan)
        ]
        fused = [t for t in times[:2] if t == t]
        speedup = times[2] / min(fused) if fused else nan
        cells = " | ".join(f"{t:.3f}" for t in times)
        lines.append(
            f"| {dtype} | {n_rows:,} | {mode} | {cells} | "
            + " | ".join(f"{g:.0f}" for g in gbps)
            + f" | {100 * gbps[0] / gbps[2]:.0f} | {speedup:.1f} |"
        )
    return "\n".join(lines)


def table_header(rows: list[dict]) -> str:
    """What the markdown table starts with: the card and the torch version."""
    return f"{rows[0]['device']}, torch {rows[0]['torch']}\n\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(2, len(dtypes), figsize=(5 * len(dtypes), 8), squeeze=False)
    for col, dtype in enumerate(dtypes):
        for row, (metric, mode, label) in enumerate(
            [
                ("time_ms", "forward_backward", "median time (ms)"),
                ("gbps", "forward_backward", "achieved GB/s"),
            ]
        ):
            ax = axes[row][col]
            common.plot_quantile_lines(
                ax,
                rows,
                PROVIDERS,
                lambda provider, mode=mode: "forward" if provider == "copy" else mode,
                metric=metric,
                dtype=dtype,
            )
            ax.set(xscale="log", yscale="log", xlabel="rows N (= 4 x anchors)", ylabel=label)
            ax.set_title(f"DFL fwd+bwd, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"{rows[0]['device']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, few repeats")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: small CPU sizes, results into a temporary directory",
    )
    args = parser.parse_args()
    if args.dry_run:
        # Before stable_dfl's Triton module is imported: its kernels are decorated at import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        rows = run(device, DRY_RUN_SIZES, ("fp32", "bf16"), min_repeats=2, budget_s=0.0)
        out_dir = Path(tempfile.mkdtemp(prefix="dfl_gpu_dry_run_"))
        print(common.write_results(rows, "dfl_gpu", plot, summary, table_header(rows), out_dir))
        print(f"dry run: wrote {sorted(p.name for p in out_dir.iterdir())} to {out_dir}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_dfl_gpu.py needs a CUDA GPU (or --dry-run to check the script)")
    device = torch.device("cuda")
    sizes = QUICK_SIZES if args.quick else SIZES
    rows = run(device, sizes, tuple(DTYPES), min_repeats=5 if args.quick else 10, budget_s=0.3)
    stem = "dfl_gpu_quick" if args.quick else "dfl_gpu"
    print(common.write_results(rows, stem, plot, summary, table_header(rows)))


if __name__ == "__main__":
    main()
