"""Command line: ``python -m stable_dfl {info,doctor,report,check-data,train} ...``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m stable_dfl")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "info",
        help="versions, CPU kernel level, backends usable here, agreement check",
        add_help=False,
    )
    commands.add_parser(
        "doctor",
        help="check the installed package: backends, clamps, head init, smoke training",
        add_help=False,
    )
    commands.add_parser(
        "report", help="judge a run's health from its metrics.jsonl, write plots", add_help=False
    )
    commands.add_parser(
        "check-data",
        help="check a YOLO dataset before training: decode every image, parse every label",
        add_help=False,
    )
    commands.add_parser(
        "train", help="train the dual-head detector (see `train --help`)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from .cli_info import run_info

        return run_info(rest)
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(rest)
    if args.command == "report":
        from .report.cli import main as report_main

        return report_main(rest)
    if args.command == "check-data":
        from .data_cli import main as check_data_main

        return check_data_main(rest)
    from .train.cli import main as train_main

    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
