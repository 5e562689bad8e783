"""How a raiox process starts and ends.

Start: third-party libraries that report usage are switched off (keep_telemetry_off)
before any of them is imported, in every process that runs raiox code.

End: SIGTERM and SIGHUP become an ordinary exit.

Python dies on SIGTERM or SIGHUP without running its atexit handlers, and one of
those stops the embedded PostgreSQL (embedded.py). So a raiox process turns those
signals into a `Terminated` exception in the main thread: a KeyboardInterrupt, so
every cleanup written for Ctrl-C runs for them too, and the process then exits
128 + the signal number like a shell expects (the server, whose normal end is a
signal, exits 0). A signal its parent set to be ignored (nohup) stays ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import MutableMapping
from types import FrameType

# The one setting that hands these choices back to the operator (docs/guides/operations.md,
# "What leaves the machine"): set, raiox leaves every variable below as the operator set it.
TELEMETRY_OPT_IN = "RAIOX_THIRD_PARTY_TELEMETRY"

# Each library's own documented switch, read when the library loads (or, for Ray,
# when it starts its processes, which inherit this environment).
TELEMETRY_OFF = {
    # ONNX Runtime (the CPU backend) loads a 1DS client that writes a device id under
    # ~/.cache/Microsoft/DeveloperTools and looks up mobile.events.data.microsoft.com
    # on import; disable_telemetry_events() after the import is too late for both.
    "ORT_DISABLE_TELEMETRY": "1",
    # Ray's usage statistics (on by default) and its prompt asking to keep them.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Hugging Face hub: the telemetry pings open_clip's and timm's downloads send.
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # The shared convention (donottrack.sh) for any other library that honours it.
    "DO_NOT_TRACK": "1",
}

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def keep_telemetry_off(env: MutableMapping[str, str] | None = None) -> bool:
    """Switch off the usage reporting of every dependency that has one, unless the
    operator opted in with RAIOX_THIRD_PARTY_TELEMETRY=1; True when switched off.

    Runs when the raiox_cli package is imported: the first thing any process running
    raiox code does (the CLI, a server under uvicorn, a Ray worker), so it comes
    before any of these libraries loads. Overrides, not defaults: a variable left
    in a shell profile must not turn reporting back on behind the operator's back."""
    env = os.environ if env is None else env
    if _truthy(env.get(TELEMETRY_OPT_IN)):
        return False
    env.update(TELEMETRY_OFF)
    ort = sys.modules.get("onnxruntime")
    if ort is not None and env is os.environ:  # loaded before raiox: stop what still can be
        ort.disable_telemetry_events()
    return True


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
