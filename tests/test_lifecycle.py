"""The embedded PostgreSQL stops whenever its last raiox process ends, however it
ends; `raiox db status` / `raiox db stop`. Real processes of the real CLI: the
checks read the process table and postmaster.pid, not raiox's own opinion."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from raiox_cli import db
from raiox_cli.cli import app
from raiox_cli.training import synth
from tests.helpers.env import TINY_ENV

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

RAIOX = Path(sys.executable).parent / "raiox"
BASE = [str(RAIOX)] if RAIOX.exists() else [sys.executable, "-m", "raiox_cli"]


def _default_signals() -> None:
    """In the child: the signals these tests send, with their default disposition. A
    process inherits ignored signals, and raiox leaves an ignored SIGINT or SIGHUP
    ignored, as the operator asked; a suite started in the background (`cmd &` in a
    script ignores SIGINT) or under nohup (SIGHUP) would otherwise see exit 0."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


class Home:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "home" / "pgdata"
        self.env = {k: v for k, v in os.environ.items() if k != "RAIOX_DATABASE_URL"}
        self.env.update(TINY_ENV, RAIOX_HOME=str(root / "home"))
        self.env.pop("RAIOX_WEIGHTS", None)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*BASE, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self, *args: str, python: str | None = None) -> subprocess.Popen:
        command = [sys.executable, "-c", python, *args] if python else [*BASE, *args]
        log = (self.root / "process.log").open("ab")
        return subprocess.Popen(
            command, env=self.env, stdout=log, stderr=log, preexec_fn=_default_signals
        )

    def log(self) -> str:
        path = self.root / "process.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def holders(self) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.pgdata / ".handle_pids.json").read_text())
        return []

    def wait_holding(self, proc: subprocess.Popen) -> None:
        """Until proc has joined the embedded server (its pid is a handle)."""
        deadline = time.monotonic() + 90
        while proc.pid not in self.holders():
            assert proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def postmasters(self) -> list[int]:
        """PostgreSQL processes serving this data folder, from the process table."""
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if proc.info["name"] == "postgres" and str(self.pgdata) in cmdline:
                found.append(proc.pid)
        return found

    def assert_running(self) -> int:
        assert (self.pgdata / "postmaster.pid").exists()
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        assert self.postmasters() == [pid]
        return pid

    def assert_stopped(self) -> None:
        assert not (self.pgdata / "postmaster.pid").exists(), self.log()
        assert self.postmasters() == [], self.log()


@pytest.fixture(scope="module")
def home() -> Iterator[Home]:
    """One migrated embedded home with a small catalogue; tests run one after the
    other on it, each leaving the server stopped (which is what they check).

    Outside pytest's temporary root: as root, PostgreSQL runs as another user who
    must traverse the path, and every pytest run chmods that root back to 0700."""
    root = Path(tempfile.mkdtemp(prefix="raiox-lifecycle-"))
    h = Home(root)
    done = h.run("init-db")
    assert done.returncode == 0, done.stderr
    h.assert_stopped()
    info = synth.make_catalogue(root / "synth", systems=3, views=2, queries=0, size=(64, 80))
    h.catalogue = info.catalogue  # type: ignore[attr-defined]
    yield h
    with contextlib.suppress(Exception):
        h.run("db", "stop", "--force")
    shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(home: Home, port: int, python: str | None = None) -> subprocess.Popen:
    args = ("serve-webhook-minimal", "--insecure-no-auth", "--port", str(port))
    return home.start(*args, python=python)


def _wait_healthy(home: Home, proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, home.log()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthcheck").status_code == 200:
                return
        assert time.monotonic() < deadline, home.log()
        time.sleep(0.1)


MAIN = "import sys; from raiox_cli.cli import main; sys.argv[0] = 'raiox'; main()"


# --- the server ------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_server_outlives_another_holder_then_a_signal_exits_0_and_stops_postgres(
    home: Home, signum: int
) -> None:
    port = _free_port()
    server = _start_server(home, port)
    _wait_healthy(home, server, port)
    postmaster = home.assert_running()
    other = home.run("init-db")  # a second holder comes and goes
    assert other.returncode == 0, other.stderr
    assert home.assert_running() == postmaster  # the server still holds it
    assert httpx.get(f"http://127.0.0.1:{port}/healthcheck").json()["database"] is True
    server.send_signal(signum)
    assert server.wait(60) == 0, home.log()
    assert "server stopped" in home.log()
    home.assert_stopped()


def test_server_error_exit_stops_postgres(home: Home) -> None:
    with socket.socket() as taken:  # the port is taken: uvicorn exits 1 after loading
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _start_server(home, taken.getsockname()[1])
        assert proc.wait(120) > 0, home.log()
    assert "address already in use" in home.log().lower()
    home.assert_stopped()


def test_server_uncaught_exception_stops_postgres(home: Home) -> None:
    boom = (
        "import raiox_cli.embedding as e\n"
        "def boom(*a, **k): raise RuntimeError('boom while loading')\n"
        "e.load_embedder = boom\n" + MAIN
    )
    proc = _start_server(home, _free_port(), python=boom)
    assert proc.wait(120) == 1
    assert "boom while loading" in home.log()
    home.assert_stopped()


# --- a long CLI command (ingest) -------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]
)
def test_ingest_stopped_by_a_signal_stops_postgres(home: Home, signum: int, code: int) -> None:
    proc = home.start("ingest", str(home.catalogue), "--workers", "1")  # type: ignore[attr-defined]
    home.wait_holding(proc)  # joined the database; loading the model next
    home.assert_running()
    proc.send_signal(signum)
    assert proc.wait(60) == code, home.log()
    home.assert_stopped()


def test_ingest_normal_and_error_exits_stop_postgres(home: Home, tmp_path: Path) -> None:
    done = home.run("ingest", str(home.catalogue), "--json")  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stderr
    home.assert_stopped()
    bad = tmp_path / "bad" / "Acme" / "Broken"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    failed = home.run("ingest", str(tmp_path / "bad"))
    assert failed.returncode == 1, failed.stderr
    home.assert_stopped()


def test_ingest_uncaught_exception_stops_postgres(home: Home) -> None:
    boom = (
        "import raiox_cli.catalogue.ingest as core, raiox_cli.db as db\n"
        "def boom(settings, *a, **k):\n"
        "    db.connect(settings).close()\n"
        "    raise RuntimeError('boom in ingest')\n"
        "core.ingest_catalogue = boom\n" + MAIN
    )
    proc = home.start("ingest", str(home.catalogue), python=boom)  # type: ignore[attr-defined]
    assert proc.wait(120) == 1
    assert "boom in ingest" in home.log()
    home.assert_stopped()


# --- a killed holder; db stop ------------------------------------------------------

# The real CLI whose ingest joins the database and then holds it (a long command
# without the model's start-up cost).
HOLD = (
    "import time, raiox_cli.catalogue.ingest as core, raiox_cli.db as db\n"
    "def hold(settings, *a, **k):\n"
    "    db.connect(settings).close()\n"
    "    time.sleep(300)\n"
    "core.ingest_catalogue = hold\n" + MAIN
)


def test_killed_last_holder_is_reported_and_the_next_command_adopts_and_stops(
    home: Home,
) -> None:
    holder = home.start("ingest", str(home.catalogue), python=HOLD)  # type: ignore[attr-defined]
    home.wait_holding(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    postmaster = home.assert_running()  # nobody left to stop it

    status = home.run("db", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["running"] and report["postmaster_pid"] == postmaster
    assert report["holders"] == [] and report["stale_handles"] == [holder.pid]
    assert report["orphaned"] is True and report["schema_version"] is not None
    assert report["data_dir_bytes"] > 1_000_000
    assert report["postgresql_version"].startswith("18") and report["pgvector_version"]
    home.assert_running()  # status only looks

    text = home.run("db", "status")
    assert "adopts" in text.stdout and str(postmaster) in text.stdout

    adopt = home.run("init-db")
    assert adopt.returncode == 0, adopt.stderr
    home.assert_stopped()


def test_db_stop_refuses_live_holders_unless_forced(home: Home) -> None:
    holder = home.start("ingest", str(home.catalogue), python=HOLD)  # type: ignore[attr-defined]
    home.wait_holding(holder)
    status = json.loads(home.run("db", "status", "--json").stdout)
    assert [h["pid"] for h in status["holders"]] == [holder.pid]
    assert "ingest" in status["holders"][0]["command"] and not status["orphaned"]

    refused = home.run("db", "stop")
    assert refused.returncode == 75
    assert f"pid {holder.pid}" in refused.stderr and "--force" in refused.stderr
    home.assert_running()

    forced = home.run("db", "stop", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    report = json.loads(forced.stdout)
    assert report["was_running"] and [h["pid"] for h in report["forced_holders"]] == [holder.pid]
    home.assert_stopped()
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(60) == 143, home.log()
    home.assert_stopped()

    again = home.run("db", "stop")
    assert again.returncode == 0 and "no embedded PostgreSQL runs" in again.stdout


# --- db status on an external server --------------------------------------------------


def test_db_status_of_an_external_database(migrated) -> None:
    result = CliRunner().invoke(app, ["db", "status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "external" and report["reachable"] is True
    assert report["schema_version"] == db.load_migrations()[-1].version
    assert report["postgresql_version"] and report["pgvector_version"]
    assert "running" not in report


def test_db_status_of_an_unreachable_database_exits_3(tmp_path: Path) -> None:
    url = "postgresql://u:secret@127.0.0.1:1/x"
    result = CliRunner().invoke(
        app, ["db", "status", "--json", "--database-url", url], env={"RAIOX_HOME": str(tmp_path)}
    )
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["reachable"] is False and "secret" not in result.stdout


def test_db_stop_leaves_external_servers_alone(migrated) -> None:
    result = CliRunner().invoke(app, ["db", "stop"])
    assert result.exit_code == 2
    assert "RAIOX_DATABASE_URL" in result.output
