"""Checkpoints under faults: unreadable, unsafe or mismatched files are refused with a clear
message, a full disk or an unwritable folder stops the run without harming the last
checkpoint, and a process killed at any moment (even mid-write) resumes to the same result."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stable_dfl.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from stable_dfl.train import checkpoint as checkpoint_module
from stable_dfl.train.cli import main as train_main

from ..support.runs import CPU, assert_bit_identical, cli_args, records, tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REPO = Path(__file__).resolve().parents[2]


class _RunsOnLoad:
    """Unpickling this calls open(path, "w"): the file's existence proves the code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(Trainer(tiny_config(tmp_path / "source"), CPU).state_dict(), path)
    return path


def _truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path, good: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _empty(path: Path, good: Path) -> None:
    path.write_bytes(b"")


def _not_a_dict(path: Path, good: Path) -> None:
    torch.save([torch.ones(2)], path)


def _bare_state_dict(path: Path, good: Path) -> None:
    torch.save(torch.load(good, weights_only=True)["model"], path)


def _other_model(path: Path, good: Path) -> None:
    save_checkpoint(Trainer(tiny_config(path.parent / "wide", width=8), CPU).state_dict(), path)


def _nan_weights(path: Path, good: Path) -> None:
    state = torch.load(good, weights_only=True)
    state["ema"]["module"]["fpn.lateral.0.0.weight"].view(-1)[-1] = float("nan")
    torch.save(state, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_truncated, "not a readable checkpoint (truncated or corrupt file?)"),
        (_garbage, "refused to load: the safe loader (weights_only=True)"),
        (_empty, "not a readable checkpoint (truncated or corrupt file?)"),
        (_not_a_dict, "not a checkpoint (holds a list"),
        (_bare_state_dict, "not a training checkpoint of this trainer (no model, ema, optimizer"),
        (_other_model, "written for a different model"),
        (_nan_weights, "ema weights are not finite (first bad tensor: 'fpn.lateral.0.0.weight')"),
    ],
    ids=lambda value: getattr(value, "__name__", "").strip("_") or None,
)
def test_a_bad_checkpoint_is_refused_with_a_clear_message(
    tmp_path, good_checkpoint, capsys, make, message
):
    bad = tmp_path / "bad.pt"
    make(bad, good_checkpoint)
    code = train_main(cli_args(tmp_path / "run", resume=str(bad)))
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"error: {bad}: ") and message in error, error
    assert "Traceback" not in error
    assert not (tmp_path / "run" / "last.pt").exists(), "nothing was trained"


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path, capsys):
    payload_ran = tmp_path / "payload_ran"
    torch.save({"model": {"w": _RunsOnLoad(payload_ran)}}, tmp_path / "evil.pt")
    # The payload is live: an unsafe load runs it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert payload_ran.exists()
    payload_ran.unlink()

    with pytest.raises(CheckpointError, match=r"Unsupported global: GLOBAL io\.open"):
        load_checkpoint(tmp_path / "evil.pt")
    code = train_main(cli_args(tmp_path / "run", init_from=str(tmp_path / "evil.pt")))
    assert code == 2 and "nothing in it was run" in capsys.readouterr().err
    assert not payload_ran.exists()


def _fail_with(error_number: int):
    """A torch.save that writes part of the file, then fails like a full disk."""
    real_save = torch.save

    def save(state, file):
        real_save({"part": torch.zeros(1000)}, file)
        raise OSError(error_number, os.strerror(error_number))

    return save


def test_a_full_disk_during_a_checkpoint_write_leaves_the_last_one_intact(
    tmp_path, monkeypatch, capsys
):
    assert train_main(cli_args(tmp_path, epochs=1)) == 0
    before = (tmp_path / "last.pt").read_bytes()
    monkeypatch.setattr(checkpoint_module.torch, "save", _fail_with(errno.ENOSPC))
    code = train_main(cli_args(tmp_path, epochs=2, resume=""))
    error = capsys.readouterr().err
    assert code == 2
    assert f"error: [Errno 28] cannot write checkpoint {tmp_path / 'last.pt'}" in error
    assert "No space left on device" in error and "is unchanged" in error
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp")), "the partial file is removed"


def test_a_full_disk_while_logging_stops_with_the_file_named(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, epochs=1), CPU)

    class FullDisk:
        name = str(tmp_path / "training_debug.log")

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    trainer.report._log = FullDisk()
    with pytest.raises(OSError, match=r"cannot write to .*training_debug\.log.*No space left"):
        trainer.fit()


def test_a_run_folder_that_cannot_be_created_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code = train_main(cli_args(tmp_path / "file" / "run"))
    error = capsys.readouterr().err
    assert code == 2 and f"cannot write to the run folder {tmp_path / 'file' / 'run'}" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_a_clear_error(tmp_path, capsys):
    assert train_main(cli_args(tmp_path, epochs=1)) == 0
    before = (tmp_path / "last.pt").read_bytes()
    tmp_path.chmod(0o555)
    try:
        code = train_main(cli_args(tmp_path, epochs=2, resume=""))
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and "error: " in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before


# ------------------------------------------------------------------ killed processes

KILL_RUN = dict(epochs=3)
#: Seconds to the end of a KILL_RUN started by a subprocess (interpreter start included),
#: so that random kill times cover the start, the training steps and the checkpoint writes.
KILL_WINDOW = (0.5, 4.0)


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _train_command(save_dir: Path) -> list[str]:
    resume = {"resume": ""} if (save_dir / "last.pt").exists() else {}
    return [sys.executable, "train.py", *cli_args(save_dir, **KILL_RUN, **resume)]


def _uninterrupted(tmp_path: Path) -> Path:
    """The run never killed, by the same command in the same environment as the killed
    ones, so that the kill is all that differs (a bit-exact comparison needs the same
    thread count and SIMD level on both sides)."""
    reference = tmp_path / "reference"
    completed = subprocess.run(
        _train_command(reference), cwd=REPO, env=_environment(), capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    return reference


def _assert_same_run(resumed: Path, reference: Path) -> None:
    """Same final state, bit for bit, and the same per-epoch metrics as the uninterrupted run."""
    final, expected = load_checkpoint(resumed / "last.pt"), load_checkpoint(reference / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "step", "best_fitness"):
        assert_bit_identical(final[key], expected[key], key)
    timing = ("time", "run_id", "epoch_seconds")
    # A killed run's records are superseded by those written after its resume.
    by_epoch = {r["epoch"]: r for r in records(resumed, "epoch")}
    for record in records(reference, "epoch"):
        got = by_epoch[record["epoch"]]
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in record.items() if k not in timing
        }


def test_killed_in_the_middle_of_a_checkpoint_write_resumes_to_the_same_result(tmp_path):
    reference = _uninterrupted(tmp_path)
    run, marker = tmp_path / "run", tmp_path / "half_written"
    command = [sys.executable, "-m", "tests.support.slow_checkpoint_train", str(marker), "2"]
    process = subprocess.Popen(
        [*command, *cli_args(run, **KILL_RUN)],
        cwd=REPO,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the epoch-2 checkpoint write never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()

    assert [p.name for p in run.glob(".last.pt.*.tmp")], "killed with a half-written file"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1, "last.pt is still epoch 1's"
    resumed = subprocess.run(
        _train_command(run), cwd=REPO, env=_environment(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    assert not list(run.glob(".last.pt.*.tmp")), "the dead process's temporary file is removed"
    _assert_same_run(run, reference)


def _kill_at_random_times(tmp_path: Path, tries: int, seed: int) -> None:
    reference = _uninterrupted(tmp_path)
    run, rng = tmp_path / "run", random.Random(seed)
    for _ in range(tries):
        process = subprocess.Popen(
            _train_command(run),
            cwd=REPO,
            env=_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            process.wait(timeout=rng.uniform(*KILL_WINDOW))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        if (run / "last.pt").exists():
            load_checkpoint(run / "last.pt")  # whenever the kill came, it loads
    finished = subprocess.run(
        _train_command(run), cwd=REPO, env=_environment(), capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr
    _assert_same_run(run, reference)


def test_killed_at_random_times_resumes_to_the_same_result(tmp_path):
    _kill_at_random_times(tmp_path, tries=3, seed=0)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(5))
def test_soak_killed_at_random_times_resumes_to_the_same_result(tmp_path, seed):
    _kill_at_random_times(tmp_path, tries=10, seed=seed)
