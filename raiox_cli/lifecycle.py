"""How a raiox process ends: SIGTERM and SIGHUP become an ordinary exit.

Python dies on SIGTERM or SIGHUP without running its atexit handlers, and one of
those stops the embedded PostgreSQL (embedded.py). So a raiox process turns those
signals into a `Terminated` exception in the main thread: a KeyboardInterrupt, so
every cleanup written for Ctrl-C runs for them too, and the process then exits
128 + the signal number like a shell expects (the server, whose normal end is a
signal, exits 0). A signal its parent set to be ignored (nohup) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; unwinds the stack like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


def exit_on_termination() -> None:
    """Make SIGTERM/SIGHUP raise Terminated for the rest of this process."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in TERMINATING:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)


def ignore_termination() -> None:
    """While the process winds down (stopping the database), further signals wait."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (*TERMINATING, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
