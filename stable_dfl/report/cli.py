"""``python -m stable_dfl report RUN_DIR [--compare RUN_A RUN_B]``.

Exit codes: 0 healthy (no check FAILed; WARN and PENDING allowed), 1 unhealthy (a check
FAILed; with ``--compare``, in either run), 2 cannot judge (no ``metrics.jsonl``, or no
step recorded yet) or bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .metrics import RunMetrics, load_run
from .verdicts import Check, HealthCriteria, is_healthy, judge_run

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_CANNOT_JUDGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    defaults = HealthCriteria()
    parser = argparse.ArgumentParser(
        prog="python -m stable_dfl report",
        description="Judge a training run against the stage-2 success criteria from its "
        "metrics.jsonl; write plots. Exit 0 healthy, 1 unhealthy, 2 cannot judge.",
    )
    parser.add_argument("run", nargs="?", help="run folder (holding metrics.jsonl) or the file")
    parser.add_argument(
        "--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="judge and overlay two runs"
    )
    parser.add_argument("--out", help="folder for the PNGs (default: <run>/report)")
    parser.add_argument("--no_plots", action="store_true", help="verdicts only")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument(
        "--settle_steps",
        type=int,
        default=defaults.settle_steps,
        help="steps before the after-warmup checks apply (seed: 50)",
    )
    parser.add_argument(
        "--window", type=int, default=defaults.window, help="steps in a 'current value' median"
    )
    parser.add_argument(
        "--dfl_max", type=float, default=defaults.dfl_max, help="FAIL above this dfl_loss"
    )
    parser.add_argument(
        "--max_norm_growth",
        type=float,
        default=defaults.max_norm_growth,
        help="FAIL when the pre-clip norm grows more than this factor",
    )
    return parser


def _table(columns: list[tuple[str, list[Check]]]) -> str:
    rows = [["check"] + [name for name, _ in columns]]
    for index, check in enumerate(columns[0][1]):
        rows.append(
            [check.label] + [f"{c[index].status.value:<7} {c[index].value}" for _, c in columns]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _details(name: str, checks: list[Check]) -> list[str]:
    return [f"  {name + ': ' if name else ''}{c.label}: {c.detail}" for c in checks if c.detail]


def _load(run: str) -> RunMetrics | None:
    try:
        metrics = load_run(run)
    except FileNotFoundError:
        print(f"error: no metrics.jsonl at {run}", file=sys.stderr)
        return None
    if not metrics.steps:
        print(f"error: {metrics.path} holds no step records yet", file=sys.stderr)
        return None
    if metrics.unreadable_lines:
        print(
            f"warning: {metrics.path}: {metrics.unreadable_lines} unreadable lines ignored",
            file=sys.stderr,
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.run is None) == (args.compare is None):
        parser.error("give either RUN_DIR or --compare RUN_A RUN_B")
    criteria = HealthCriteria(
        settle_steps=args.settle_steps,
        window=args.window,
        dfl_max=args.dfl_max,
        max_norm_growth=args.max_norm_growth,
    )
    paths = args.compare or [args.run]
    runs = [_load(p) for p in paths]
    if any(run is None for run in runs):
        return EXIT_CANNOT_JUDGE
    names = [Path(p).name or str(p) for p in paths]
    verdicts = [judge_run(run, criteria) for run in runs]
    healthy = all(is_healthy(checks) for checks in verdicts)
    plots: list[str] = []
    if not args.no_plots:
        out = Path(args.out) if args.out else runs[0].path.parent / "report"
        from .plots import plot_comparison, plot_run

        if len(runs) == 1:
            plots.append(str(plot_run(runs[0], out / "training_health.png")))
        else:
            plots.append(
                str(
                    plot_comparison(
                        runs[0],
                        runs[1],
                        (names[0], names[1]),
                        out / f"compare_{names[0]}_vs_{names[1]}.png",
                    )
                )
            )
    if args.json:
        document = {
            "healthy": healthy,
            "runs": [
                {
                    "run": str(run.path.parent),
                    "steps": len(run.steps),
                    "healthy": is_healthy(checks),
                    "checks": [asdict(c) for c in checks],
                }
                for run, checks in zip(runs, verdicts, strict=True)
            ],
            "plots": plots,
        }
        print(json.dumps(document, indent=2, default=str))
    else:
        for run, name in zip(runs, names, strict=True):
            last = run.steps[-1]
            print(
                f"{name}: {len(run.steps)} steps (last: step {last['step']}, epoch {last.get('epoch')})"
            )
        print()
        print(_table(list(zip(names if len(runs) > 1 else ["verdict"], verdicts, strict=True))))
        details = [
            line
            for name, checks in zip(names, verdicts, strict=True)
            for line in _details(name if len(runs) > 1 else "", checks)
        ]
        if details:
            print("\ndetails:")
            print("\n".join(details))
        print(f"\n{'HEALTHY' if healthy else 'UNHEALTHY'}")
        for plot in plots:
            print(f"plot: {plot}")
    return EXIT_HEALTHY if healthy else EXIT_UNHEALTHY
