"""Stopping on SIGTERM / SIGINT without losing work: the signal only asks; the trainer stops
after the step in progress, writes ``last.pt`` (atomically, as every save) and exits with
128 + the signal's number (143, 130), as a process killed by it would.

A second signal of the same kind is not caught: it acts as it would without the trainer
(SIGINT raises KeyboardInterrupt, SIGTERM ends the process).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped on a signal; the last checkpoint holds everything done so far."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Catches the stop signals while installed (main thread only: Python delivers signals
    there) and remembers the first one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
        # os.write: print() is not safe inside a signal handler.
        os.write(
            2,
            f"{signal.Signals(signum).name}: stopping after the current step (send it again "
            "to stop at once)\n".encode(),
        )
