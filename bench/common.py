"""Helpers shared by the benchmark scripts in ``bench/``.

- :func:`ultralytics_style_dfl`: ultralytics' DFL as its bbox loss calls it, the eager baseline;
- :func:`loss_step`: a forward or forward+backward call of a loss, to time;
- :func:`git_commit`, :func:`cpu_model`, :func:`cpu_description`, :func:`run_metadata`: what
  identifies a run (commit, machine, torch version);
- :func:`result_row`: one row of results (kernel, provider, mode, metric, dtype, x and the
  median and 20%/80% quantiles of y, then the run's metadata), the CSV schema of
  ``bench_dfl.py``, ``bench_dfl_gpu.py`` and ``bench_integrations.py``;
- :func:`record_case`, :func:`run_timed`: what a case of ``bench/test_*.py`` records and how it
  is timed (pytest-benchmark rounds within a :class:`RoundBudget`);
- :func:`run_benchmark_suite`, :func:`suite_main`: one of ``bench/test_*.py`` under
  pytest-benchmark, to a JSON, and the command line of the script that runs and renders it
  (with an Inductor cache per forced CPU level: :func:`inductor_cache_per_level`);
- :func:`rows_from_benchmark_json`: those rows from a pytest-benchmark JSON whose cases put
  their fields in ``extra_info`` (``bench/test_*.py``);
- :func:`write_csv`, :func:`write_results`: a run's rows to ``<stem>.csv`` (appended),
  ``.json``, ``.png`` and ``.md``;
- :func:`plot_quantile_lines`: median lines with a 20-80% band, one per provider.

Scripts run as ``python bench/<script>.py`` have ``bench/`` on ``sys.path`` and import this as
``common``. It imports torch but not stable_dfl, so that a script may set environment variables
(``TRITON_INTERPRET``) before stable_dfl is imported.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stable_dfl.ops.reference import TARGET_MARGIN

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
N_BINS = 16


def ultralytics_style_dfl(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """ultralytics.utils.loss.DFLoss as its bbox loss calls it (fp32 math, as under its AMP)."""
    pred_dist = pred.view(-1, N_BINS).float()
    target = target.clamp(0, N_BINS - 1 - TARGET_MARGIN)
    tl = target.long()
    tr = tl + 1
    wl = tr - target
    wr = 1 - wl
    per_side = (
        F.cross_entropy(pred_dist, tl.view(-1), reduction="none").view(tl.shape) * wl
        + F.cross_entropy(pred_dist, tr.view(-1), reduction="none").view(tl.shape) * wr
    )
    return (per_side.mean(-1, keepdim=True) * weight).sum() / weight.sum().clamp(min=1)


def loss_step(
    loss_fn: Callable[..., torch.Tensor], mode: str, pred: torch.Tensor, *args
) -> Callable[[], object]:
    """One timed call of ``loss_fn(pred, *args)``: ``mode`` ``"forward"``, or
    ``"forward_backward"`` through a leaf copy of ``pred`` whose gradient is dropped after."""
    if mode == "forward":
        return lambda: loss_fn(pred, *args)
    leaf = pred.clone().requires_grad_()

    def forward_backward():
        loss_fn(leaf, *args).backward()
        leaf.grad = None

    return forward_backward


def git_commit(short: bool = True) -> str:
    """The checkout's HEAD commit (abbreviated unless ``short=False``), or ``"unknown"``."""
    try:
        return subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=BENCH,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` says."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def cpu_description() -> str:
    """The CPU, the number of threads torch uses and the SIMD level of stable_dfl's CPU kernels,
    e.g. ``"<model>, 2 threads, avx2 kernels"``."""
    from stable_dfl.ops import backends

    level = backends.cpu_kernel_isa() or "no compiled"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {level} kernels"


def run_metadata(device_description: str, **extra: str) -> dict[str, str]:
    """The columns every row of a run ends with: device, torch version, ``extra``, commit."""
    return {
        "device": device_description,
        "torch": torch.__version__,
        **extra,
        "commit": git_commit(),
    }


def result_row(
    kernel: str,
    provider: str,
    mode: str,
    metric: str,
    dtype: str,
    x: int,
    y50: float,
    y20: float,
    y80: float,
    meta: dict[str, str],
    digits: int = 4,
) -> dict:
    """One result: the median ``y50`` and 20%/80% quantiles rounded to ``digits``, then ``meta``."""
    return {
        "kernel": kernel,
        "provider": provider,
        "mode": mode,
        "metric": metric,
        "dtype": dtype,
        "x": x,
        "y50": round(y50, digits),
        "y20": round(y20, digits),
        "y80": round(y80, digits),
        **meta,
    }


@dataclass(frozen=True)
class RoundBudget:
    """How many timed rounds a case gets: as many as fit ``seconds``, within
    ``[min_rounds, max_rounds]``; ``quick_rounds`` in the smoke mode."""

    seconds: float
    min_rounds: int
    max_rounds: int
    quick_rounds: int


def record_case(benchmark, **info) -> None:
    """Records a case's fields (kernel, provider, mode, dtype, x, ...) and the machine in
    ``extra_info``, which is what :func:`rows_from_benchmark_json` reads."""
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(run_metadata(cpu_description()))


def run_timed(
    benchmark, step: Callable[[], object], quick: bool, budget: RoundBudget, **info
) -> None:
    """Times ``step`` after one untimed call (compilation, first touch of memory), in as many
    rounds as ``budget`` allows; ``info`` goes to :func:`record_case`."""
    record_case(benchmark, **info)
    step()
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    if quick:
        rounds = budget.quick_rounds
    else:
        fitting = int(budget.seconds / max(once, 1e-9))
        rounds = min(budget.max_rounds, max(budget.min_rounds, fitting))
    benchmark.pedantic(step, rounds=rounds, iterations=1)


def run_benchmark_suite(
    test_file: str, json_path: Path, quick: bool, select: str | None = None, runs: int = 1
) -> None:
    """Runs ``bench/<test_file>`` under pytest-benchmark ``runs`` times, their results (every
    round's time) to ``json_path`` (:func:`merge_benchmark_runs`); ``quick`` is the suite's
    smoke mode, ``select`` a ``-k`` expression."""
    if runs == 1:
        _run_suite_once(test_file, json_path, quick, select)
        return
    parts = [json_path.with_name(f"{json_path.stem}.run{i}.json") for i in range(runs)]
    for part in parts:
        _run_suite_once(test_file, part, quick, select)
    merge_benchmark_runs(parts, json_path)
    for part in parts:
        part.unlink()


def merge_benchmark_runs(paths: list[Path], out: Path) -> None:
    """The pytest-benchmark JSONs of several runs of one suite as one JSON at ``out``: each
    case's rounds are those of every run, in run order, and a measured ``value`` is the median
    of the runs' values. A case's median then reflects the minutes the runs spread over, not
    one run's few seconds, in which a slow phase of a shared machine can decide a ratio."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    merged = runs[0]
    for case in merged["benchmarks"]:
        same = [
            next(c for c in run["benchmarks"] if c["fullname"] == case["fullname"]) for run in runs
        ]
        case["stats"]["data"] = [seconds for c in same for seconds in c["stats"]["data"]]
        if "value" in case["extra_info"]:
            case["extra_info"]["value"] = statistics.median(c["extra_info"]["value"] for c in same)
    merged["runs"] = len(runs)
    out.write_text(json.dumps(merged, indent=4))


def runs_in_benchmark_json(path: Path) -> int:
    """How many runs of its suite the JSON at ``path`` holds (:func:`merge_benchmark_runs`)."""
    return int(json.loads(Path(path).read_text()).get("runs", 1))


def _run_suite_once(test_file: str, json_path: Path, quick: bool, select: str | None) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH / test_file),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "--benchmark-save-data",
        "--benchmark-columns=median,iqr,rounds",
        "-q",
        "-p",
        "no:cacheprovider",
        *(["--bench-quick"] if quick else []),
        *(["-k", select] if select else []),
    ]
    subprocess.run(command, check=True, env=inductor_cache_per_level(dict(os.environ)))


def inductor_cache_per_level(env: dict[str, str]) -> dict[str, str]:
    """``env`` with an Inductor cache of the forced CPU level's own
    (``build/inductor-cache/<level>``, as ``scripts/run_tests.sh`` uses): code that
    torch.compile cached under another ``ATEN_CPU_CAPABILITY`` can be reused under this one
    and compute wrong values."""
    level = env.get("ATEN_CPU_CAPABILITY")
    if level:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(BENCH.parent / "build" / "inductor-cache" / level)
    return env


def suite_main(
    description: str,
    test_file: str,
    default_stem: str,
    plot_fn: Callable[[list[dict], Path], None],
    summary_fn: Callable[[list[dict]], str],
    stem_help: str = "",
    default_runs: int = 1,
) -> None:
    """The command line of a script that runs ``bench/<test_file>`` (``default_runs`` times
    unless ``--runs`` says otherwise; ``--quick``: once) or reads a JSON it wrote, and renders
    its results to ``bench/results/<stem>.*``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few rounds (a smoke run)"
    )
    parser.add_argument("-k", dest="select", help="run only the suite's cases matching this")
    parser.add_argument(
        "--runs",
        type=int,
        default=default_runs,
        help=f"runs of the suite whose rounds each case's median is over (default: {default_runs})",
    )
    parser.add_argument(
        "--from_json",
        type=Path,
        help="render this pytest-benchmark JSON instead of running (the CSV is not appended to)",
    )
    parser.add_argument(
        "--stem",
        help=f"name of the results files in bench/results/ (default: {default_stem}, "
        f"{default_stem}_quick){stem_help}",
    )
    args = parser.parse_args()
    stem = args.stem or (f"{default_stem}_quick" if args.quick else default_stem)
    json_path = args.from_json
    if json_path is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        json_path = RESULTS / f"{stem}_benchmarks.json"
        runs = 1 if args.quick else args.runs
        run_benchmark_suite(test_file, json_path, args.quick, args.select, runs)
    rows = rows_from_benchmark_json(json_path)
    header = run_header(rows, runs_in_benchmark_json(json_path))
    table = write_results(
        rows, stem, plot_fn, summary_fn, header, append_csv=args.from_json is None
    )
    print(table)


#: The fields of a row that a benchmark case records in ``extra_info``, besides its metadata.
CASE_FIELDS = ("kernel", "provider", "mode", "dtype", "x")


def rows_from_benchmark_json(path: Path) -> list[dict]:
    """The result rows of a pytest-benchmark JSON (``--benchmark-save-data``): per case, its
    median and 20%/80% quantiles in ms over the timed rounds, or the ``value`` of the ``metric``
    it measured; the metadata (device, torch, commit) as the case recorded it."""
    rows = []
    for case in json.loads(Path(path).read_text())["benchmarks"]:
        info = dict(case["extra_info"])
        fields = [info.pop(name) for name in CASE_FIELDS]
        if "value" in info:  # a measured quantity, not a time: its "metric" names it
            metric, value = info.pop("metric"), info.pop("value")
            rows.append(result_row(*fields[:3], metric, *fields[3:], value, value, value, info, 9))
            continue
        samples = [1e3 * seconds for seconds in case["stats"]["data"]]
        if len(samples) > 1:
            quantiles = statistics.quantiles(samples, n=10, method="inclusive")
            low, high = quantiles[1], quantiles[7]
        else:
            low = high = samples[0]
        median = statistics.median(samples)
        rows.append(result_row(*fields[:3], "time_ms", *fields[3:], median, low, high, info))
    return rows


def run_header(rows: list[dict], runs: int = 1) -> str:
    """The line an ``.md`` of results starts with: where and at which commit they were taken,
    and over how many runs of the suite the medians are."""
    first = rows[0]
    over = "" if runs == 1 else f" over the rounds of {runs} runs of the suite"
    return (
        f"{first['device']}, torch {first['torch']}, commit {first['commit']}; medians{over}.\n\n"
    )


def write_csv(rows: list[dict], path: Path, append: bool = True) -> None:
    """``rows`` to a CSV file with their keys as columns; the header only when it starts a file."""
    new_file = not append or not path.exists()
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def write_results(
    rows: list[dict],
    stem: str,
    plot_fn: Callable[[list[dict], Path], None],
    summary_fn: Callable[[list[dict]], str],
    header: str = "",
    out_dir: Path = RESULTS,
    append_csv: bool = True,
) -> str:
    """Appends ``rows`` to ``<out_dir>/<stem>.csv`` (unless ``append_csv`` is false: rows
    rendered again), writes them to ``.json``, a plot to ``.png`` and ``header`` followed by
    the summary table to ``.md``; returns the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if append_csv:
        write_csv(rows, out_dir / f"{stem}.csv")
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    plot_fn(rows, out_dir / f"{stem}.png")
    table = summary_fn(rows)
    (out_dir / f"{stem}.md").write_text(f"{header}{table}\n")
    return table


def plot_quantile_lines(
    ax, rows: list[dict], providers: Iterable[str], mode_of: Callable[[str], str], **where
) -> None:
    """On ``ax``, per provider, the median ``y50`` against ``x`` with a 20-80% band, over the
    rows in mode ``mode_of(provider)`` whose other fields equal ``where``."""
    for provider in providers:
        pts = sorted(
            (r["x"], r["y50"], r["y20"], r["y80"])
            for r in rows
            if r["provider"] == provider
            and r["mode"] == mode_of(provider)
            and all(r[key] == value for key, value in where.items())
        )
        if pts:
            xs, ys, lo, hi = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=provider)
            ax.fill_between(xs, lo, hi, alpha=0.2)
