"""The CPU DFL benchmark suite, under pytest-benchmark.

    pytest bench/test_dfl_cpu.py --benchmark-only --benchmark-json=OUT.json --benchmark-save-data
    python bench/bench_dfl.py --from_json OUT.json   # -> bench/results/dfl_cpu.{csv,json,md,png}

(``python bench/bench_dfl.py`` runs both.) Each group is one dtype, size and mode with every
provider of :mod:`bench_dfl` in it: stable_dfl, the eager reference, ultralytics-style,
``torch.compile`` of the reference and the memory floor. The masked group times one
detector-shaped call at 10% foreground (8 images x 8,400 anchors x 4 sides): the fused call
with ``mask=``, the fused call on ``pred[fg_mask]``, ultralytics' own indexing path, the
unmasked call on every anchor, and writing the zero gradient alone. Each case records what it
measured (kernel, provider, mode, dtype, size, the machine) in ``extra_info``, which is what
the renderer reads.
"""

from __future__ import annotations

from collections.abc import Callable

import bench_dfl
import common
import pytest
import torch

from stable_dfl import stable_dfl_loss

pytestmark = pytest.mark.benchmark(warmup=False, disable_gc=True)

#: Timed rounds per case: as many as fit the seconds, within the bounds. The bound is high
#: enough that every provider in a group at N >= 537,600 is timed over 1-2 s (a fast kernel too),
#: so that a slow phase of a shared machine weighs alike on all of them.
BUDGET = common.RoundBudget(2.0, 7, 400, 3)
QUICK_SIZES = (6_400,)
MASKED_ANCHORS, QUICK_MASKED_ANCHORS = 8 * 8_400, 8 * 400
FOREGROUND = 0.10


def dfl_cases(quick: bool):
    sizes = QUICK_SIZES if quick else bench_dfl.SIZES
    for dtype in bench_dfl.DTYPES:
        for n_rows in sizes:
            for mode in ("forward", "forward_backward"):
                for provider in bench_dfl.PROVIDERS:
                    if mode == "forward" and provider == "copy_prealloc":
                        continue
                    yield dtype, n_rows, mode, provider


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dfl_case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--bench-quick")
        cases = list(dfl_cases(quick))
        metafunc.parametrize("dfl_case", cases, ids=[f"{d}-{n}-{m}-{p}" for d, n, m, p in cases])


def test_dfl(benchmark, dfl_case, quick):
    dtype, n_rows, mode, provider = dfl_case
    benchmark.group = f"dfl {dtype} N={n_rows:,} {mode}"
    pred, target, weight = bench_dfl.make_inputs(n_rows, bench_dfl.DTYPES[dtype])
    step = bench_dfl.make_step(provider, mode, pred, target, weight)
    common.run_timed(
        benchmark,
        step,
        quick,
        BUDGET,
        kernel="dfl",
        provider=provider,
        mode=mode,
        dtype=dtype,
        x=n_rows,
    )


def masked_step(provider: str, pred, target, weight, foreground) -> Callable[[], object]:
    """One fwd+bwd of the DFL of the foreground anchors only, as ``provider`` computes it."""
    if provider == "zero_grad_floor":
        return lambda: torch.zeros_like(pred)
    avg_factor = weight[foreground].sum()
    if provider == "stable_dfl_mask":

        def loss_fn(p, t, w):
            return stable_dfl_loss(
                p, t, w, mask=foreground[:, None], avg_factor=avg_factor, backend="cpu"
            )
    elif provider == "stable_dfl_indexed":

        def loss_fn(p, t, w):
            return stable_dfl_loss(
                p[foreground], t[foreground], w[foreground], avg_factor=avg_factor, backend="cpu"
            )
    elif provider == "ultralytics_indexed":

        def loss_fn(p, t, w):
            return common.ultralytics_style_dfl(p[foreground], t[foreground], w[foreground])
    else:

        def loss_fn(p, t, w):
            return stable_dfl_loss(p, t, w, avg_factor=avg_factor, backend="cpu")

    return common.loss_step(loss_fn, "forward_backward", pred, target, weight)


@pytest.mark.parametrize("provider", bench_dfl.MASKED_PROVIDERS)
@pytest.mark.parametrize("dtype", list(bench_dfl.DTYPES))
def test_dfl_masked(benchmark, dtype, provider, quick):
    anchors = QUICK_MASKED_ANCHORS if quick else MASKED_ANCHORS
    benchmark.group = f"dfl masked {dtype} {anchors:,} anchors, {FOREGROUND:.0%} foreground"
    pred, target, weight = bench_dfl.make_inputs(4 * anchors, bench_dfl.DTYPES[dtype])
    generator = torch.Generator().manual_seed(1)
    foreground = torch.rand(anchors, generator=generator) < FOREGROUND
    step = masked_step(provider, pred, target, weight, foreground)
    common.run_timed(
        benchmark,
        step,
        quick,
        BUDGET,
        kernel="dfl_masked",
        provider=provider,
        mode="forward_backward",
        dtype=dtype,
        x=anchors,
    )


@pytest.mark.parametrize("metric", ["peak_extra_mb", "held_mb"])
@pytest.mark.parametrize("provider", bench_dfl.MEMORY_PROVIDERS)
def test_dfl_extra_memory(benchmark, provider, metric, quick):
    """RSS growth of one fwd+bwd in a fresh process, at its peak or once the step is over
    (see bench_dfl.extra_memory_mb; the time is that process's)."""
    if quick:
        pytest.skip("memory is measured in full runs only")
    benchmark.group = f"dfl {metric} fp32 N={bench_dfl.MEMORY_ROWS:,}"
    common.record_case(
        benchmark,
        kernel="dfl",
        provider=provider,
        mode="forward_backward",
        dtype="fp32",
        x=bench_dfl.MEMORY_ROWS,
    )

    def measure() -> None:
        benchmark.extra_info["metric"] = metric
        measured = bench_dfl.extra_memory_mb(provider, bench_dfl.MEMORY_ROWS, "fp32")
        benchmark.extra_info["value"] = round(measured[metric], 1)

    benchmark.pedantic(measure, rounds=1, iterations=1)
