"""``python -m stable_dfl train`` / ``train.py``: parse options, run the trainer.

Exit codes: 0 done; 2 the run could not start or could not write its files (a missing,
corrupt, unsafe, diverged or mismatched checkpoint; an unwritable or full run folder);
3 training diverged and was stopped (see ``--max_consecutive_skips``). Each error is one
``error: ...`` line on stderr; the last checkpoint written is left intact.
"""

from __future__ import annotations

import sys

from .checkpoint import CheckpointError
from .config import parse_config
from .distributed import init_distributed, shutdown_distributed
from .trainer import Trainer, TrainingDivergedError


def main(argv: list[str] | None = None) -> int:
    config = parse_config(list(sys.argv[1:] if argv is None else argv))
    context = init_distributed(config.device)
    try:
        Trainer(config, context).fit()
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0
