"""``python -m stable_dfl train`` / ``train.py``: parse options, run the trainer."""

from __future__ import annotations

import sys

from .checkpoint import NonFiniteCheckpointError
from .config import parse_config
from .distributed import init_distributed, shutdown_distributed
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    config = parse_config(list(sys.argv[1:] if argv is None else argv))
    context = init_distributed(config.device)
    try:
        Trainer(config, context).fit()
    except (NonFiniteCheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0
