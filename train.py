"""Train the dual-head detector: the same as ``python -m stable_dfl train``."""

import sys

from stable_dfl.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
