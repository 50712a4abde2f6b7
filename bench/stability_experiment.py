"""Before/after experiment of the stage-2 gradient fix, with an ablation of each fix.

Configurations (docs/GRADIENT_FIX_QUICKSTART.md, "Key Hyperparameter Changes"):

* ``old``: lr 1e-4, weight decay 0.05, DFL weight 1.0, clip 5.0, naive DFL (plain
  ``log(softmax)`` in the autocast dtype, no floor, no cap), PyTorch's default head init,
  the plain ``clip_grad_norm_`` + ``scaler.step`` recipe (no guard);
* ``fixed``: lr 3e-5, weight decay 0.005, DFL weight 0.5, clip 0.5, stable DFL, small
  head init, GradGuard;
* ``fixed - <fix>``: the fixed configuration with one fix switched off (``guard``,
  ``stable_dfl``, ``head_init``, ``hyperparameters``);
* ``old @ lr 3e-3`` / ``fixed @ lr 3e-3``: both at a 30x / 100x higher learning rate,
  the stress that makes the old configuration fail on this easy data.

Every run: the same synthetic data (``--seed`` picks weights and sampling), fp16 autocast
with a GradScaler (CPU fp16 autocast works in torch 2.14, about 8x slower than fp32 on
CPU; bf16 would hide the fp16 failure modes), a tiny detector and one short epoch so that
the whole experiment fits in about 15 minutes on 2 shared CPU cores. Each run is
``python -m stable_dfl train`` in its own process; its ``metrics.jsonl`` is read with the
health report's loader and judged with its checks (settling period shortened to the run).

Writes ``bench/results/stability.csv`` (one row per run), ``stability.md`` (means and
ranges over seeds per configuration, and the trainer's explanation of each run's first
NaN/Inf step that is not an fp16 loss-scale overflow) and ``stability.png``.

    python bench/stability_experiment.py [--seeds 0 1 2] [--workers 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS

from stable_dfl.report import HealthCriteria, judge_run, load_run
from stable_dfl.report.forensics import explained_steps
from stable_dfl.report.verdicts import is_healthy

OLD_HYPERPARAMETERS = {
    "lr": "1e-4",
    "weight_decay": "0.05",
    "dfl_weight": "1.0",
    "gradient_clip_norm": "5.0",
}
NEW_HYPERPARAMETERS = {
    "lr": "3e-5",
    "weight_decay": "0.005",
    "dfl_weight": "0.5",
    "gradient_clip_norm": "0.5",
}
OLD_SWITCHES = {"dfl_impl": "naive", "head_init": "default", "nan_guard": "off"}
NEW_SWITCHES = {"dfl_impl": "stable", "head_init": "small", "nan_guard": "on"}
#: Each fix as the options that switch it off, from the fixed configuration.
FIXES_OFF = {
    "guard": {"nan_guard": "off"},
    "stable_dfl": {"dfl_impl": "naive"},
    "head_init": {"head_init": "default"},
    "hyperparameters": OLD_HYPERPARAMETERS,
}
STRESS_LR = "3e-3"


def configurations() -> dict[str, dict[str, str]]:
    old = {**OLD_HYPERPARAMETERS, **OLD_SWITCHES}
    fixed = {**NEW_HYPERPARAMETERS, **NEW_SWITCHES}
    configs = {"old": old, "fixed": fixed}
    for fix, options in FIXES_OFF.items():
        configs[f"fixed - {fix}"] = {**fixed, **options}
    configs[f"old @ lr {STRESS_LR}"] = {**old, "lr": STRESS_LR}
    configs[f"fixed @ lr {STRESS_LR}"] = {**fixed, "lr": STRESS_LR}
    return configs


def train_command(options: dict[str, str], seed: int, steps: int, save_dir: Path) -> list[str]:
    batch_size = 8
    shared = {
        "amp": "fp16",
        "device": "cpu",
        "seed": str(seed),
        "epochs": "1",
        "batch_size": str(batch_size),
        "train_images": str(steps * batch_size),
        "val_images": "32",
        "image_size": "64",
        "width": "8",
        "fpn_channels": "32",
        "embed_dim": "16",
        "warmup_steps": str(max(steps // 4, 1)),
        "log_interval": "1000",
        "debug_interval": "1000000",
        "save_dir": str(save_dir),
    }
    arguments = [f"--{k}={v}" for k, v in {**shared, **options}.items()]
    return [sys.executable, "-m", "stable_dfl", "train", *arguments]


def _nanmedian(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def summarise(
    config: str, seed: int, run_dir: Path, seconds: float, steps: int
) -> dict[str, object]:
    run = load_run(run_dir)
    checks = judge_run(run, HealthCriteria(settle_steps=steps // 4, window=10))
    last = run.steps[-10:]
    maps = [r["standard/map50"] for r in run.evaluations if r.get("kind") == "epoch"]
    finite_norms = [v for v in run.series("grad_norm") if math.isfinite(v)]
    # The trainer's explanation of its first skipped step that the loss scale does not explain.
    real = [e for e in explained_steps(run) if e.verdict != "loss scale"]
    return {
        "config": config,
        "seed": seed,
        "steps": len(run.steps),
        "nonfinite_steps": sum(1 for r in run.steps if not r["grad_finite"]),
        "nonfinite_applied": sum(1 for r in run.steps if not r["grad_finite"] and not r["skipped"]),
        "skipped_steps": sum(1 for r in run.steps if r["skipped"]),
        "max_grad_norm": max(finite_norms, default=math.nan),
        "final_loss_scale": run.steps[-1]["loss_scale"],
        "final_total_loss": _nanmedian([r["total_loss"] for r in last]),
        "final_dfl_loss": _nanmedian([r["dfl_loss"] for r in last]),
        "final_cls_loss": _nanmedian([r["cls_loss"] for r in last]),
        "final_map50": maps[-1] if maps else math.nan,
        "healthy": is_healthy(checks),
        "failed_checks": " ".join(c.name for c in checks if c.status.value == "FAIL"),
        "seconds": round(seconds, 1),
        "first_real_nan_step": real[0].steps[0] if real else "",
        "first_real_nan": f"{real[0].message}; verdict: {real[0].verdict}" if real else "",
    }


def run_one(
    config: str, options: dict[str, str], seed: int, steps: int, runs_dir: Path
) -> dict[str, object]:
    save_dir = runs_dir / f"{config.replace(' ', '').replace('@', '_at_')}_seed{seed}"
    started = time.perf_counter()
    completed = subprocess.run(
        train_command(options, seed, steps, save_dir),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed:\n{completed.stderr[-2000:]}")
    row = summarise(config, seed, save_dir, seconds, steps)
    print(f"{config:<28} seed {seed}: {row}", flush=True)
    return row


def _fmt(values: list[float], digits: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    mean = statistics.fmean(finite)
    low, high = min(finite), max(finite)
    text = (
        f"{mean:{digits}}" if low == high else f"{mean:{digits}} ({low:{digits}}-{high:{digits}})"
    )
    return text + ("" if len(finite) == len(values) else f" [{len(values) - len(finite)} nan]")


def write_markdown(
    rows: list[dict[str, object]], order: list[str], path: Path, header: str
) -> None:
    columns = (
        ("nonfinite_steps", "NaN/Inf steps", ".1f"),
        ("nonfinite_applied", "NaN/Inf applied", ".1f"),
        ("skipped_steps", "skipped", ".1f"),
        ("max_grad_norm", "max grad norm (pre-clip)", ".3g"),
        ("final_loss_scale", "final loss scale", ".3g"),
        ("final_dfl_loss", "final dfl_loss", ".2f"),
        ("final_total_loss", "final total loss", ".3g"),
        ("final_map50", "mAP@0.5", ".3f"),
    )
    lines = [header, "", "| config | healthy | " + " | ".join(c[1] for c in columns) + " |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for config in order:
        group = [r for r in rows if r["config"] == config]
        healthy = f"{sum(bool(r['healthy']) for r in group)}/{len(group)}"
        cells = [_fmt([float(r[key]) for r in group], digits) for key, _, digits in columns]
        lines.append(f"| {config} | {healthy} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds (min-max). Per-run rows: `stability.csv`."]
    explained = [
        r for config in order for r in rows if r["config"] == config and r["first_real_nan"]
    ]
    if explained:
        lines += [
            "",
            "The first NaN/Inf step of each run that is not an fp16 loss-scale overflow, as the "
            "trainer's forensics explains it (`forensics/step_<k>.json`):",
            "",
        ]
        lines += [
            f"- {r['config']}, seed {r['seed']}, step {r['first_real_nan_step']}: {r['first_real_nan']}"
            for r in explained
        ]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, object]], order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("nonfinite_steps", "NaN/Inf gradient steps", False),
        ("max_grad_norm", "max pre-clip grad norm", True),
        ("final_dfl_loss", "final dfl_loss (median of last 10 steps)", False),
        ("final_map50", "val mAP@0.5 (standard head)", False),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(18, 5))
    for axis, (key, title, log) in zip(axes, panels, strict=True):
        for index, config in enumerate(order):
            values = [float(r[key]) for r in rows if r["config"] == config]
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                axis.bar(
                    index,
                    statistics.fmean(finite),
                    color="C0" if config.startswith("fixed") else "C3",
                    alpha=0.6,
                )
            axis.scatter([index] * len(finite), finite, color="black", s=10, zorder=3)
        axis.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        if log:
            axis.set_yscale("log")
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(
        "Stage-2 fix: old vs fixed vs each fix switched off (fp16 AMP, CPU; bars = mean, dots = seeds)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (one epoch)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--runs_dir", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--configs", nargs="+", help="subset of configuration names")
    args = parser.parse_args()
    configs = configurations()
    order = args.configs or list(configs)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="stability_"))
    jobs = [(c, configs[c], s) for c in order for s in args.seeds]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args.steps, runs_dir), jobs))
    minutes = (time.perf_counter() - started) / 60
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "stability.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"Stability experiment: {len(order)} configurations x seeds {args.seeds}, {args.steps} steps "
        f"each (batch 8, 64 px, fp16 autocast + GradScaler on CPU), {minutes:.1f} min with "
        f"{args.workers} workers. Runs: {runs_dir}"
    )
    write_markdown(rows, order, RESULTS / "stability.md", header)
    plot(rows, order, RESULTS / "stability.png")
    print((RESULTS / "stability.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
