"""Command line: ``python -m stable_dfl {info,train} ...``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m stable_dfl")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, backends built and usable here, agreement check")
    commands.add_parser(
        "train", help="train the dual-head detector (see `train --help`)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from .cli_info import run_info

        return run_info()
    from .train.cli import main as train_main

    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
