"""``python -m tests.support.slow_checkpoint_train MARKER EPOCH TRAIN_ARGS...``: the trainer's command
line, except that the checkpoint of epoch EPOCH is written half, then MARKER is created,
then the writer sleeps: a test kills the process there, in the middle of a checkpoint write."""

import io
import sys
import time
from pathlib import Path

import torch

from stable_dfl.train.cli import main

marker, slow_epoch, train_args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
real_save = torch.save


def slow_save(state, file):
    if state.get("epoch") != slow_epoch:
        return real_save(state, file)
    buffer = io.BytesIO()
    real_save(state, buffer)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    marker.touch()
    time.sleep(600)
    file.write(data[len(data) // 2 :])


torch.save = slow_save
sys.exit(main(train_args))
