"""One run per run folder: an exclusive lock on ``--save_dir``, held while a run writes there.

The lock is an ``flock`` on ``<save_dir>/.lock``: the kernel releases it when the process
ends, however it ends (SIGKILL and power loss included), so a lock left by a dead process is
never mistaken for a live one. The file itself stays (deleting it would let two runs lock
two different files of the same name); it names the holder for the error message. POSIX
only, as the trainer is.

Taking the lock also removes the temporary checkpoints (``.last.pt.<pid>.tmp``) that a
process killed in the middle of a save left behind.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from pathlib import Path
from typing import TextIO

LOCK_NAME = ".lock"
#: ``save_checkpoint``'s temporary files: ``.<name>.<pid>.tmp``.
TEMPORARY_CHECKPOINT = re.compile(r"^\..+\.pt\.(\d+)\.tmp$")


class RunFolderBusyError(RuntimeError):
    """Another live process trains in this run folder."""


class RunFolderLock:
    """Holds the run folder's lock from :meth:`acquire` until :meth:`release` (or until the
    object is garbage-collected, or the process ends)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._file: TextIO | None = None
        self.removed_temporary_files: list[Path] = []

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Raises RunFolderBusyError naming the holder when another process holds the lock,
        OSError naming the folder when it cannot be created or written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            file = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")
        except OSError as error:
            raise OSError(
                error.errno, f"cannot write to the run folder {self.folder}: {error}"
            ) from error
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunFolderBusyError(
                f"{self.folder} is in use by another run ({holder}); wait for it to end or "
                "give another --save_dir"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        file.flush()
        self._file = file
        self.removed_temporary_files = remove_dead_temporary_checkpoints(self.folder)

    def release(self) -> None:
        if self._file is None:
            return
        self._file.truncate(0)
        self._file.close()  # closing the descriptor drops the flock
        self._file = None


def remove_dead_temporary_checkpoints(folder: Path) -> list[Path]:
    """Removes the temporary checkpoints in ``folder`` whose writing process is gone."""
    removed = []
    for path in folder.iterdir():
        match = TEMPORARY_CHECKPOINT.match(path.name)
        if match and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes no checkpoint before it holds the lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
