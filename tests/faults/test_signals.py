"""SIGTERM and SIGINT stop training after the step in progress: ``last.pt`` is written
(atomically), one line says where the run stopped, the exit code is 143 / 130, no
traceback, no temporary file; ``--resume`` finishes the epoch it was in, to the same
weights as a run never stopped."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stable_dfl.train import Trainer, load_checkpoint
from stable_dfl.train.stop import TrainingStopped

from ..support.runs import CPU, assert_bit_identical, cli_args, records, tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REPO = Path(__file__).resolve().parents[2]
#: 2 epochs of 4 batches: a stop at batch 3 is in the middle of the first.
RUN = dict(train_images=16, epochs=2)


def _signal_at_step(trainer: Trainer, step: int, signum: int) -> None:
    """Sends ``signum`` to this process during the forward pass of batch ``step``."""

    def pre_forward(_module, _inputs):
        if trainer.model.training and trainer.step == step:
            os.kill(os.getpid(), signum)

    trainer.model.register_forward_pre_hook(pre_forward)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_saves_the_step_and_the_resume_matches_an_unstopped_run(
    tmp_path, signum
):
    reference = Trainer(tiny_config(tmp_path / "reference", **RUN), CPU, console=io.StringIO())
    reference.fit()

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, **RUN), CPU, console=io.StringIO())
    _signal_at_step(trainer, 3, signum)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 128 + signum
    name = signal.Signals(signum).name
    assert f"Stopped by {name} at batch 3 (epoch 1, batch 3/4)" in str(stopped.value)
    saved = load_checkpoint(run / "last.pt")
    assert saved["step"] == 3 and saved["epoch"] == 0 and saved["epoch_batches_done"] == 3
    assert not list(run.glob(".*.tmp"))
    assert signal.getsignal(signum) is not trainer.stop._handle, "the handlers are put back"

    resumed = Trainer(tiny_config(run, **RUN, resume=""), CPU, console=io.StringIO())
    resumed.fit()
    assert resumed.step == reference.step == 8
    for key in ("model", "ema", "optimizer"):
        assert_bit_identical(
            load_checkpoint(run / "last.pt")[key],
            load_checkpoint(reference.save_dir / "last.pt")[key],
            key,
        )
    timing = ("time", "run_id", "epoch_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in records(run, "epoch")] == [
        {k: v for k, v in r.items() if k not in timing}
        for r in records(reference.save_dir, "epoch")
    ]


def test_a_signal_on_an_epochs_last_step_resumes_into_its_validation(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, **RUN), CPU, console=io.StringIO())
    _signal_at_step(trainer, 4, signal.SIGTERM)
    with pytest.raises(TrainingStopped, match=r"at batch 4 \(epoch 1, batch 4/4\)"):
        trainer.fit()
    assert not records(tmp_path, "epoch"), "the epoch was not validated before the stop"
    resumed = Trainer(tiny_config(tmp_path, **RUN, resume=""), CPU, console=io.StringIO())
    resumed.fit()
    assert [r["epoch"] for r in records(tmp_path, "epoch")] == [1, 2]
    assert [r["step"] for r in records(tmp_path, "step")][-5:] == [4, 5, 6, 7, 8]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_command_line_stops_on_a_signal_with_one_line_and_its_exit_code(tmp_path, signum):
    """A real signal from outside, while the process trains."""
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "train.py", *cli_args(run, train_images=64, epochs=50)],
        cwd=REPO,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(r["kind"] == "step" for r in _records_so_far(run)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no training step within 2 minutes"
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    stop_lines = [line for line in out.splitlines() if line.startswith(f"Stopped by {name}")]
    assert len(stop_lines) == 1 and stop_lines[0].endswith("continue with --resume")
    assert not list(run.glob(".*.tmp"))
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == max(r["step"] for r in records(run, "step"))

    resumed = subprocess.run(
        [sys.executable, "train.py", *cli_args(run, train_images=64, epochs=1, resume="")],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr


def _records_so_far(run: Path) -> list[dict]:
    try:
        return records(run, "step")
    except (FileNotFoundError, ValueError):
        return []
