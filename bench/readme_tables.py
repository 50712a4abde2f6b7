"""README's benchmark tables, generated from ``bench/results/``.

README marks each generated block with the results file it comes from::

    <!-- generated from bench/results/dfl_cpu.md -->
    ...the file's content...
    <!-- end of bench/results/dfl_cpu.md -->

``python bench/readme_tables.py`` rewrites every block from its file; ``--check`` changes
nothing and exits 1 when a block differs from its file (the test suite runs it), so the numbers
in README are always those a benchmark run wrote.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(
    r"(?P<begin><!-- generated from (?P<path>\S+) -->\n)(?P<body>.*?)(?P<end><!-- end of (?P=path) -->)",
    re.DOTALL,
)


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated block replaced by its file's current content."""

    def fill(match: re.Match) -> str:
        content = (root / match["path"]).read_text().rstrip("\n") + "\n"
        return match["begin"] + content + match["end"]

    return BLOCK.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if README differs from the results"
    )
    args = parser.parse_args()
    text = README.read_text()
    blocks = [m["path"] for m in BLOCK.finditer(text)]
    updated = render(text)
    if args.check:
        if updated != text:
            stale = [p for p in blocks if render(_only(text, p)) != _only(text, p)]
            print(
                f"README is not what bench/results holds: {', '.join(stale)}; run "
                "python bench/readme_tables.py",
                file=sys.stderr,
            )
            return 1
        print(f"README agrees with {len(blocks)} results file(s)")
        return 0
    README.write_text(updated)
    print(f"README: {len(blocks)} block(s) rewritten from bench/results")
    return 0


def _only(text: str, path: str) -> str:
    """The generated block of ``path`` in ``text``."""
    return next(m[0] for m in BLOCK.finditer(text) if m["path"] == path)


if __name__ == "__main__":
    sys.exit(main())
