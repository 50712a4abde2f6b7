"""GradGuard against the standard gradient recipe, on detector-shaped parameter sets.

Recipes (each ends with the host reading whether the step is finite, as a trainer must):

  amp/standard   scaler.unscale_(opt); norm = clip_grad_norm_(params, max_norm, foreach=True);
                 bool(torch.isfinite(norm)); scaler.update()
                 (float16 gradients: GradScaler's internal unscale, as unscale_ refuses them)
  amp/guard      result = guard.check_and_clip(opt, scaler); result.finite; scaler.update()
  plain/standard norm = clip_grad_norm_(params, max_norm, foreach=True); bool(torch.isfinite(norm))
  plain/guard    result = guard.check_and_clip(); result.finite

Two scenarios: ``clip`` (max_norm 0.5, below every set's norm of 1.7 to 5) and ``no-clip``
(max_norm 10). Passes over gradient memory (R = a full read, W = a full write):

  amp/standard   unscale R+W, norm R, clip R+W                  -> 3R+2W
  amp/guard      fused unscale+norm+check R+W, clip R+W         -> 2R+2W
                 (no-clip on CPU: the identity multiply is skipped -> 1R+1W)
  plain/standard norm R, clip R+W                               -> 2R+1W
  plain/guard    fused norm+check R, clip R+W                   -> 2R+1W
                 (no-clip on CPU                                -> 1R)

``clip_grad_norm_`` multiplies even by 1.0, so the standard counts do not change.

The gradients are refreshed from a pristine copy before every timed run: clipping the same
buffers again and again shrinks them into denormals, which slows ``_foreach_mul_`` by
orders of magnitude on CPUs and would fake any comparison.

Writes ``guard_<device>_<n>threads.csv``, ``.json``, ``.png`` and ``.md`` (the table README's is
generated from) into ``--out`` (default bench/results).
Run: ``python bench/bench_guard.py [--device cpu|cuda] [--threads N]``.
On a shared machine, rerun when the quantiles are far apart: a descheduled OpenMP thread
stalls every recipe's parallel regions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import cpu_model, git_commit, write_csv

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stable_dfl import GradGuard
from stable_dfl.ops.grad_norm import resolve_grad_norm_backend

PARAMETER_SETS = {"3M": (3.2e6, 75), "11M": (11.2e6, 60), "26M": (25.9e6, 100)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
RECIPES = ("amp/standard", "amp/guard", "plain/standard", "plain/guard")
SCENARIOS = {"clip": 0.5, "no-clip": 10.0}  # max_norm
SCALE = 2.0**16


def passes(recipe: str, clips: bool, device: torch.device) -> str:
    """Full passes over gradient memory of ``recipe`` (module docstring)."""
    amp = recipe.startswith("amp")
    if recipe.endswith("standard"):
        return "3R+2W" if amp else "2R+1W"
    if clips or device.type != "cpu":
        return "2R+2W" if amp else "2R+1W"
    return "1R+1W" if amp else "1R"


def detector_shapes(target: float, n_convs: int) -> list[tuple[int, ...]]:
    """Conv weights with BatchNorm weight and bias, widths doubling over five stages.

    ``3 * n_convs + 2`` tensors (a detection head's last conv has a bias) whose sizes add
    up to about ``target``.
    """

    def shapes_for(base: int) -> list[tuple[int, ...]]:
        shapes = []
        stage_len = n_convs // 5
        channels_in = 3
        for i in range(n_convs):
            stage = min(i // stage_len, 4)
            channels = base * 2**stage
            kernel = 3 if i % 2 == 0 else 1
            shapes += [(channels, channels_in, kernel, kernel), (channels,), (channels,)]
            channels_in = channels
        shapes += [(80, channels_in, 1, 1), (80,)]
        return shapes

    base = 1
    while sum(_numel(s) for s in shapes_for(base + 1)) <= target:
        base += 1
    return shapes_for(base)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def machine_info(device: torch.device) -> dict[str, object]:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(short=False),
        "device": str(device),
        "grad_norm_backend": resolve_grad_norm_backend("auto", device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Workload:
    """Parameters with gradients, an optimizer and a scaler; gradients refreshable."""

    def __init__(
        self,
        shapes: list[tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        max_norm: float,
    ):
        self.max_norm = max_norm
        gen = torch.Generator(device=device).manual_seed(0)
        self.params = [
            torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes
        ]
        # Gradients of unit-ish size; scaled by SCALE for the AMP recipes.
        self.pristine = [
            (torch.randn(s, generator=gen, device=device) * 1e-3).to(dtype) for s in shapes
        ]
        self.pristine_scaled = [(g.float() * SCALE).to(dtype) for g in self.pristine]
        for p, g in zip(self.params, self.pristine, strict=True):
            p.grad = g.clone()
        self.grads = [p.grad for p in self.params]
        self.optimizer = torch.optim.SGD(self.params, lr=0.1)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=SCALE, growth_interval=10**9)
        self.scaler.scale(torch.ones((), device=device))  # creates the scale tensor
        self.guard = GradGuard([(f"p{i}", p) for i, p in enumerate(self.params)], max_norm)
        self.allow_fp16 = dtype == torch.float16

    def refresh(self, scaled: bool) -> None:
        torch._foreach_copy_(self.grads, self.pristine_scaled if scaled else self.pristine)

    def amp_standard(self) -> bool:
        if self.allow_fp16:  # scaler.unscale_ refuses float16 gradients; do what it does inside
            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            inv_scale = self.scaler._scale.double().reciprocal().float()
            found_inf = torch.zeros((), device=inv_scale.device)
            state["found_inf_per_device"] = self.scaler._unscale_grads_(
                self.optimizer, inv_scale, found_inf, True
            )
        else:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        finite = bool(torch.isfinite(norm))
        self.scaler.update()
        return finite

    def amp_guard(self) -> bool:
        finite = self.guard.check_and_clip(self.optimizer, self.scaler).finite
        self.scaler.update()
        return finite

    def plain_standard(self) -> bool:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        return bool(torch.isfinite(norm))

    def plain_guard(self) -> bool:
        return self.guard.check_and_clip().finite


def time_recipes(
    workload: Workload, recipes: dict[str, Callable[[], bool]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per run; recipes interleaved so that machine noise hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in recipes}
    sync = torch.cuda.synchronize if workload.grads[0].is_cuda else (lambda: None)
    for iteration in range(warmup + repeats):
        for name, recipe in recipes.items():
            workload.refresh(scaled=name.startswith("amp"))
            sync()
            start = time.perf_counter()
            assert recipe(), f"{name} found non-finite gradients"
            sync()
            if iteration >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(rows: list[dict[str, object]], info: dict[str, object], repeats: int) -> str:
    """The ``.md``: a line saying where and how it was measured, then per parameter set, dtype,
    max_norm and recipe family the standard and guard medians, the speed-up and the passes."""
    where = info.get("gpu", info["cpu"])
    lines = [
        f"{where}, {info['torch_threads']} threads, torch {info['torch']}, commit "
        f"{str(info['git_commit'])[:7]}; medians of {repeats} runs, the recipes interleaved.",
        "",
        "| parameters (tensors) | grads | max_norm | recipe | standard ms | guard ms | speedup "
        "| passes over gradient memory (standard → guard) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_recipe = {(r["set"], r["dtype"], r["scenario"], r["recipe"]): r for r in rows}
    for set_name, dtype, scenario, recipe in by_recipe:
        family, kind = str(recipe).split("/")
        if kind != "guard":
            continue
        guard = by_recipe[(set_name, dtype, scenario, recipe)]
        standard = by_recipe[(set_name, dtype, scenario, f"{family}/standard")]
        label = "AMP (GradScaler)" if family == "amp" else "no scaler"
        lines.append(
            f"| {guard['params'] / 1e6:.0f}M ({guard['tensors']}) | {dtype} | "
            f"{SCENARIOS[str(scenario)]:g} | {label} | {standard['median_ms']:.2f} | "
            f"{guard['median_ms']:.2f} | {guard['speedup_vs_standard']:.2f}x | "
            f"{standard['passes']} → {guard['passes']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(
        {(r["set"], r["dtype"], r["scenario"]) for r in rows},
        key=lambda c: (c[2], c[1], float(c[0][:-1])),
    )
    fig, ax = plt.subplots(figsize=(14, 4.5))
    for k, family in enumerate(("amp", "plain")):
        speedups = [
            next(
                r["speedup_vs_standard"]
                for r in rows
                if (r["set"], r["dtype"], r["scenario"]) == c and r["recipe"] == f"{family}/guard"
            )
            for c in cases
        ]
        xs = [i + (k - 0.5) * 0.4 for i in range(len(cases))]
        ax.bar(xs, speedups, 0.4, label=f"{family}: guard vs standard")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), [f"{s} {d}\n{c}" for s, d, c in cases], fontsize=8)
    ax.set_ylabel("speedup of median time (higher is better)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sets", default=",".join(PARAMETER_SETS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    print(json.dumps(info))

    rows: list[dict[str, object]] = []
    for set_name in args.sets.split(","):
        target, n_convs = PARAMETER_SETS[set_name]
        shapes = detector_shapes(target, n_convs)
        for dtype_name in args.dtypes.split(","):
            for scenario, max_norm in SCENARIOS.items():
                workload = Workload(shapes, DTYPES[dtype_name], device, max_norm)
                recipes = {
                    "amp/standard": workload.amp_standard,
                    "amp/guard": workload.amp_guard,
                    "plain/standard": workload.plain_standard,
                    "plain/guard": workload.plain_guard,
                }
                times = time_recipes(workload, recipes, args.repeats, args.warmup)
                workload.refresh(scaled=False)
                clips = workload.guard.check_and_clip().clip_coef < 1.0
                n_params = sum(p.numel() for p in workload.params)
                for recipe, values in times.items():
                    baseline = statistics.median(times[recipe.split("/")[0] + "/standard"])
                    row = {
                        "set": set_name,
                        "dtype": dtype_name,
                        "scenario": scenario,
                        "params": n_params,
                        "tensors": len(shapes),
                        "recipe": recipe,
                        "passes": passes(recipe, clips, device),
                        "median_ms": round(statistics.median(values), 3),
                        "p10_ms": round(quantile(values, 0.1), 3),
                        "p90_ms": round(quantile(values, 0.9), 3),
                        "speedup_vs_standard": round(baseline / statistics.median(values), 2),
                        "repeats": len(values),
                    }
                    rows.append(row)
                    print(json.dumps(row))
                del workload

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"guard_{device.type}_{info['torch_threads']}threads")
    write_csv(rows, Path(stem + ".csv"), append=False)
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "scenarios": SCENARIOS, "results": rows}, f, indent=2)
    plot(
        rows,
        stem + ".png",
        f"GradGuard vs standard recipe, {info.get('gpu', info['cpu'])}, "
        f"{info['torch_threads']} threads, torch {info['torch']}",
    )
    with open(stem + ".md", "w") as f:
        f.write(summary(rows, info, args.repeats))
    print(f"wrote {stem}.csv, .json, .png, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
