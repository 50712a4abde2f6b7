"""``python -m stable_dfl report RUN_DIR [--run_id ID] [--compare RUN_A RUN_B]``.

Exit codes: 0 healthy (no check FAILed; WARN and PENDING allowed), 1 unhealthy (a check
FAILed; with ``--compare``, in either run), 2 cannot judge (no readable ``metrics.jsonl``,
no run ``--run_id`` in it, or no step recorded yet) or bad usage.

A file holding several runs is judged on its latest unless ``--run_id`` picks one (a
``note:`` on stderr names them); with ``--compare`` each file's latest is judged.
Malformed lines are ignored, named in a ``warning:`` on stderr (and in ``--json``); no
content of the file makes the report fail with a traceback. Steps that the trainer
explained (``forensics/step_<k>.json``) are listed with where their NaN/Inf started.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .forensics import explained_steps
from .metrics import NO_RUN_ID, NoSuchRunError, RunMetrics, format_run_id, format_run_ids, load_run
from .verdicts import Check, HealthCriteria, is_healthy, judge_run

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_CANNOT_JUDGE = 0, 1, 2
#: How many malformed lines the warning names.
NAMED_LINES = 5


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
    parser.add_argument(
        "--run_id",
        metavar="ID",
        help="judge this run of the file (default: the latest; "
        f"'{NO_RUN_ID}': the records without a run id)",
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


def _malformed_summary(run: RunMetrics) -> str:
    count = len(run.malformed)
    shown = [f"line {item.line}: {item.reason}" for item in run.malformed[:NAMED_LINES]]
    if count > NAMED_LINES:
        shown.append(f"and {count - NAMED_LINES} more")
    return f"{count} malformed line{'s' if count != 1 else ''} ignored ({'; '.join(shown)})"


def _load(run: str, run_id: str | None) -> RunMetrics | None:
    try:
        metrics = load_run(run, run_id)
    except FileNotFoundError:
        print(f"error: no metrics.jsonl at {run}", file=sys.stderr)
        return None
    except NoSuchRunError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    except (OSError, ValueError) as error:  # a folder named metrics.jsonl, no permission, ...
        print(f"error: cannot read the metrics of {run}: {error}", file=sys.stderr)
        return None
    if metrics.malformed:
        print(f"warning: {metrics.path}: {_malformed_summary(metrics)}", file=sys.stderr)
    if run_id is None and len(metrics.run_ids) > 1:
        print(
            f"note: {metrics.path} holds {len(metrics.run_ids)} runs "
            f"({format_run_ids(metrics.run_ids)}); judging the latest, "
            f"{format_run_id(metrics.run_id)} (choose with --run_id)",
            file=sys.stderr,
        )
    if not metrics.steps:
        of_run = f" of run {format_run_id(metrics.run_id)}" if len(metrics.run_ids) > 1 else ""
        print(f"error: {metrics.path} holds no step records{of_run} yet", file=sys.stderr)
        return None
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.run is None) == (args.compare is None):
        parser.error("give either RUN_DIR or --compare RUN_A RUN_B")
    if args.run_id is not None and args.compare is not None:
        parser.error("--run_id picks a run of RUN_DIR; --compare judges each file's latest")
    criteria = HealthCriteria(
        settle_steps=args.settle_steps,
        window=args.window,
        dfl_max=args.dfl_max,
        max_norm_growth=args.max_norm_growth,
    )
    paths = args.compare or [args.run]
    runs = [_load(p, args.run_id) for p in paths]
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
                    "run_id": run.run_id,
                    "run_ids": run.run_ids,
                    "steps": len(run.steps),
                    "malformed_lines": [asdict(item) for item in run.malformed],
                    "healthy": is_healthy(checks),
                    "checks": [asdict(c) for c in checks],
                    "explained_steps": [e.to_json() for e in explained_steps(run)],
                }
                for run, checks in zip(runs, verdicts, strict=True)
            ],
            "plots": plots,
        }
        print(json.dumps(document, indent=2, default=str))
    else:
        for run, name in zip(runs, names, strict=True):
            last = run.steps[-1]
            run_id = f", run {run.run_id}" if run.run_id is not None else ""
            print(
                f"{name}: {len(run.steps)} steps (last: step {last['step']}, "
                f"epoch {last.get('epoch')}{run_id})"
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
        for run, name in zip(runs, names, strict=True):
            explained = explained_steps(run)
            if explained:
                print(f"\nwhy steps went non-finite{f' in {name}' if len(runs) > 1 else ''}:")
                print("\n".join(f"  {e.describe()}" for e in explained))
        print(f"\n{'HEALTHY' if healthy else 'UNHEALTHY'}")
        for plot in plots:
            print(f"plot: {plot}")
    return EXIT_HEALTHY if healthy else EXIT_UNHEALTHY
