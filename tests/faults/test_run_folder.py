"""One run per run folder: a second run is refused before it writes anything, a lock of a
dead process never blocks, and temporary checkpoints of killed processes are removed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stable_dfl.report.metrics import load_run
from stable_dfl.train import Trainer
from stable_dfl.train.cli import main as train_main
from stable_dfl.train.run_folder import RunFolderBusyError, RunFolderLock

from ..support.runs import CPU, cli_args, tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REPO = Path(__file__).resolve().parents[2]


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_second_run_in_a_busy_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    assert train_main(cli_args(tmp_path)) == 0
    capsys.readouterr()
    before = _folder_files(tmp_path)
    holder = RunFolderLock(tmp_path)
    holder.acquire()
    try:
        code = train_main(cli_args(tmp_path, epochs=2, resume=""))
    finally:
        holder.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {tmp_path} is in use by another run (pid {os.getpid()}")
    assert _folder_files(tmp_path) == {**before, ".lock": b""}, "the refused run wrote nothing"


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path):
    Trainer(tiny_config(tmp_path), CPU, console=io.StringIO()).fit()
    trainer = Trainer(tiny_config(tmp_path, epochs=2, resume=""), CPU, console=io.StringIO())
    with pytest.raises(RunFolderBusyError):
        Trainer(tiny_config(tmp_path), CPU, console=io.StringIO())
    trainer.close()
    Trainer(tiny_config(tmp_path, epochs=2, resume=""), CPU, console=io.StringIO()).fit()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from stable_dfl.train.run_folder import RunFolderLock\n"
            "lock = RunFolderLock(sys.argv[1])\n"
            "lock.acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderBusyError, match=f"pid {holder.pid} on "):
        RunFolderLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    lock = RunFolderLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead process's lock: the stale file is harmless
    lock.release()


def test_temporary_checkpoints_of_dead_processes_are_removed_at_start(tmp_path, capsys):
    dead = tmp_path / f".last.pt.{_dead_pid()}.tmp"
    alive = tmp_path / f".last.pt.{os.getppid()}.tmp"  # a live process: maybe still writing
    dead.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"being written")
    assert train_main(cli_args(tmp_path)) == 0
    assert not dead.exists() and alive.exists()
    assert f"Removed {dead}, left by a process killed while saving" in capsys.readouterr().out


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_each_run_in_a_folder_has_its_own_run_id_and_a_resume_keeps_it(tmp_path):
    assert train_main(cli_args(tmp_path)) == 0
    assert train_main(cli_args(tmp_path, epochs=2, resume="")) == 0
    assert train_main(cli_args(tmp_path)) == 0  # a new run in the same folder
    run = load_run(tmp_path)
    assert len(run.run_ids) == 2
    first, second = run.run_ids
    assert run.run_id == second and len(run.steps) == 2
    assert len(load_run(tmp_path, run_id=first).steps) == 4
