"""``python -m stable_dfl check-data ROOT [--splits train val] [--names a,b]
[--skip_bad_files] [--no_cache]``: check a YOLO-format dataset before training.

Decodes every image and parses every label line (:func:`stable_dfl.data.check_dataset`),
printing progress and a summary on stdout. Exit codes: 0 the dataset is usable (with
``--skip_bad_files``, once its bad files are dropped), 2 it is refused (one ``error:``
line on stderr) or the arguments are bad.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from .data import YoloFormatError, check_dataset

EXIT_USABLE, EXIT_REFUSED = 0, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stable_dfl check-data",
        description="Check a YOLO-format dataset (ROOT/images/SPLIT, ROOT/labels/SPLIT) the "
        "way training reads it: decode every image, parse every label line. Exit 0 usable, "
        "2 refused.",
    )
    parser.add_argument("root", help="dataset root (as --data of train)")
    parser.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="split folders to check"
    )
    parser.add_argument("--names", help="comma-separated class names (else classes.txt/data.yaml)")
    parser.add_argument(
        "--skip_bad_files",
        action="store_true",
        help="drop bad images and label lines (each is counted and listed) instead of refusing",
    )
    parser.add_argument(
        "--no_cache", action="store_true", help="check every file again; read and write no cache"
    )
    return parser


class _Progress:
    """Progress lines: rewritten in place on a terminal, one line each otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.terminal = stream.isatty()
        self.prefix: str | None = None

    def __call__(self, text: str) -> None:
        if not self.terminal:
            print(text, file=self.stream, flush=True)
            return
        prefix = text.rpartition(":")[0]
        if self.prefix is not None and prefix != self.prefix:
            self.stream.write("\n")  # a new split: keep the last count of the previous one
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.prefix = prefix

    def finish(self) -> None:
        if self.terminal and self.prefix is not None:
            self.stream.write("\n")
            self.stream.flush()
        self.prefix = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.names.split(",") if args.names else None
    progress = _Progress(sys.stdout)
    try:
        result = check_dataset(
            args.root,
            args.splits,
            names,
            skip_bad=args.skip_bad_files,
            cache=not args.no_cache,
            progress=progress,
        )
    except YoloFormatError as error:
        progress.finish()
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_REFUSED
    progress.finish()
    for line in result.summary_lines():
        print(line)
    return EXIT_USABLE
