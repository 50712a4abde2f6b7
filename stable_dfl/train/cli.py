"""``python -m stable_dfl train`` / ``train.py``: parse options, run the trainer.

Exit codes: 0 done; 2 the run could not start or could not write its files (an option out
of range, a broken or refused dataset, a missing, corrupt, unsafe, diverged or mismatched
checkpoint, a run folder in use by another run, unwritable or full); 3 training diverged
and was stopped (see ``--max_consecutive_skips``); 143 / 130 stopped by SIGTERM / SIGINT
after saving ``last.pt`` (continue with ``--resume``). Each error is one ``error: ...``
line on stderr, never a traceback; the last checkpoint written is left intact.
"""

from __future__ import annotations

import signal
import sys

from ..data import YoloFormatError
from .checkpoint import CheckpointError
from .config import ConfigError, parse_config
from .distributed import init_distributed, shutdown_distributed
from .run_folder import RunFolderBusyError
from .stop import TrainingStopped
from .trainer import Trainer, TrainingDivergedError

#: What a user can fix (options, data, checkpoints, the run folder, the disk): one line, exit 2.
USER_ERRORS = (ConfigError, YoloFormatError, CheckpointError, RunFolderBusyError, OSError)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(list(sys.argv[1:] if argv is None else argv))
    context = init_distributed(config.device)
    try:
        Trainer(config, context).fit()
    except TrainingStopped as stopped:
        return stopped.exit_code  # the trainer has logged where it stopped
    except KeyboardInterrupt:
        # Before training (the dataset check), or a second SIGINT that asked to stop at once.
        print("stopped by SIGINT; checkpoints written before are intact", file=sys.stderr)
        return 128 + signal.SIGINT
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0
