"""bench/bench_server.py stops what it starts, however it is stopped: a killed
benchmark used to leave embedded PostgreSQL servers running under /tmp."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from raiox_cli.db import embedded
from tests.helpers.env import TINY_ENV

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_server.py"


def _wait_for(check: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_bench_leaves_no_server_running(tmp_path: Path, signum: int) -> None:
    env = {**os.environ, **TINY_ENV, "TMPDIR": str(tmp_path)}
    env.pop("RAIOX_DATABASE_URL", None)
    command = [
        sys.executable, str(BENCH), "--model", "raiox-tiny", "--requests", "400",
        "--rate", "2", "--systems", "2", "--views", "1", "--queries", "1", "--size", "64",
    ]  # fmt: skip
    bench = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        logs = lambda: list(tmp_path.glob("raiox-bench-server-*/server-batch8.log"))  # noqa: E731
        _wait_for(
            lambda: logs() and "listening" in logs()[0].read_text(), 120, "the server never started"
        )
        pgdata = logs()[0].parent / "home" / "pgdata"
        server_pids = [h.pid for h in embedded.inspect(pgdata).holders if h.pid != bench.pid]
        assert embedded.inspect(pgdata).running and server_pids
        bench.send_signal(signum)
        bench.wait(60)
    finally:
        if bench.poll() is None:
            bench.kill()
    # SIGTERM: the bench stops its server child and then its database; SIGKILL: the
    # child hears of its parent's death (PR_SET_PDEATHSIG), and as the last holder
    # stops the database itself.
    _wait_for(lambda: not embedded.inspect(pgdata).running, 60, "PostgreSQL still running")
    for pid in server_pids:
        _wait_for(lambda pid=pid: not _alive(pid), 30, f"server {pid} still running")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # reaped or not
    except psutil.NoSuchProcess:
        return False
