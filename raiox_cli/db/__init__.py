"""Connect to PostgreSQL (external URL or the embedded server) and apply migrations."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from raiox_cli.config import Settings
from raiox_cli.db import embedded, queries
from raiox_cli.errors import DatabaseUnavailable, SchemaError

log = logging.getLogger(__name__)

MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def embedded_url(pgdata: Path) -> str:
    """Start (or join) the embedded PostgreSQL for this data folder; return its URL.

    This process holds it until it exits; the last holder stops it (embedded.py)."""
    return embedded.join(pgdata)


def database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    url = embedded_url(settings.pgdata_dir)
    _migrate_embedded(settings.pgdata_dir, url)
    return url


_embedded_lock = threading.Lock()  # guards _migrated
_migrated: set[Path] = set()


def _migrate_embedded(pgdata: Path, url: str) -> None:
    """The embedded default is raiox's own database: a fresh (or older) home gets its
    schema here, once per process, as `init-db` would (same lock, same migrations),
    so a new user's first `raiox ingest` just works. External servers
    (RAIOX_DATABASE_URL) are never changed behind the operator's back: init-db."""
    with _embedded_lock:
        if pgdata not in _migrated:
            _apply_migrations(url)
            _migrated.add(pgdata)


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def connect(settings: Settings, *, autocommit: bool = False) -> psycopg.Connection:
    """A connection with pgvector registered. Requires the schema (run init-db)."""
    conn = _connect_raw(database_url(settings), autocommit=autocommit)
    try:
        _register_vector(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_raw(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(
            f"cannot connect to {describe(url)}: {reason}; check RAIOX_DATABASE_URL "
            "or unset it to use the embedded database"
        ) from exc


def _register_vector(conn: psycopg.Connection) -> None:
    try:
        register_vector(conn)
    except psycopg.ProgrammingError as exc:  # type "vector" not found
        if not conn.autocommit:
            conn.rollback()
        raise SchemaError('the database has no schema yet; run "raiox init-db"') from exc


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("raiox_cli.db").joinpath("sql").iterdir():
        match = MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


@dataclass(frozen=True)
class MigrationReport:
    url: str
    applied: list[str]
    version: int


def migrate(settings: Settings) -> MigrationReport:
    """Apply pending migrations in order, each once, each in its own transaction."""
    if settings.database_url:
        return _apply_migrations(settings.database_url)
    url = embedded_url(settings.pgdata_dir)
    report = _apply_migrations(url)
    with _embedded_lock:
        _migrated.add(settings.pgdata_dir)
    return report


def _apply_migrations(url: str) -> MigrationReport:
    migrations = load_migrations()
    latest = migrations[-1].version
    applied: list[str] = []
    with _connect_raw(url) as conn:
        # One migrator at a time, even when several raiox processes start together
        # (CREATE EXTENSION itself races otherwise).
        queries.lock_migrations(conn)
        conn.commit()
        _ensure_pgvector(conn)
        queries.create_migrations_table(conn)
        done = queries.applied_migrations(conn)
        if done and max(done) > latest:
            raise SchemaError(
                f"the database schema is version {max(done)} but this raiox knows only "
                f"up to {latest}; upgrade raiox (pip install -U raiox)"
            )
        conn.commit()
        for migration in migrations:
            if migration.version in done:
                continue
            with conn.transaction():
                conn.execute(migration.sql)
                queries.record_migration(conn, migration.version, migration.name)
            applied.append(f"{migration.version:03d}_{migration.name}")
        queries.unlock_migrations(conn)
        conn.commit()
    return MigrationReport(url=describe(url), applied=applied, version=latest)


def check_schema(conn: psycopg.Connection) -> None:
    """Refuse to work on a database whose schema is missing, behind or ahead."""
    latest = load_migrations()[-1].version
    current = queries.schema_version(conn)
    if current is None:
        raise SchemaError('the database has no raiox schema; run "raiox init-db"')
    if current > latest:
        raise SchemaError(
            f"the database schema is version {current} but this raiox knows only up to "
            f"{latest}; upgrade raiox"
        )
    if current < latest:
        raise SchemaError(f'the database schema is version {current}; run "raiox init-db"')


def _ensure_pgvector(conn: psycopg.Connection) -> None:
    if not queries.vector_extension_available(conn):
        raise SchemaError(
            "the pgvector extension is not installed on this PostgreSQL server; install it "
            "(e.g. apt install postgresql-<version>-pgvector, or see "
            "https://github.com/pgvector/pgvector#installation) and run init-db again"
        )
    try:
        queries.create_vector_extension(conn)
        conn.commit()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SchemaError(
            'not allowed to "CREATE EXTENSION vector"; ask a superuser to run it once '
            "in this database, then run init-db again"
        ) from exc


@dataclass(frozen=True)
class Status:
    """`raiox db status`: what runs, which versions, which schema, who holds it."""

    mode: str  # "embedded" or "external"
    url: str | None  # without password
    reachable: bool
    error: str | None
    postgresql_version: str | None
    pgvector_version: str | None
    schema_version: int | None
    embedded: Any = None  # embedded.State for an embedded home

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mode": self.mode,
            "url": self.url,
            "reachable": self.reachable,
            "error": self.error,
            "postgresql_version": self.postgresql_version,
            "pgvector_version": self.pgvector_version,
            "schema_version": self.schema_version,
        }
        if self.embedded is not None:
            state = self.embedded
            data.update(
                data_dir=str(state.data_dir),
                running=state.running,
                postmaster_pid=state.postmaster_pid,
                data_dir_bytes=state.size_bytes,
                holders=[h.to_dict() for h in state.holders],
                stale_handles=state.stale_handles,
                orphaned=state.orphaned,
            )
        return data


def status(settings: Settings) -> Status:
    """Inspect the database without starting the embedded server or joining it."""
    state = None if settings.database_url else embedded.inspect(settings.pgdata_dir)
    url = settings.database_url or (state.url if state else None)
    versions: dict[str, Any] = {}
    error = None
    if url is None:  # embedded and stopped: what its binaries would run
        postgres, pgvector = embedded.versions()
        versions = {"postgresql_version": postgres, "pgvector_version": pgvector}
    else:
        try:
            with _connect_raw(url, autocommit=True) as conn:
                versions = {
                    "postgresql_version": queries.server_version(conn),
                    "pgvector_version": queries.pgvector_version(conn),
                    "schema_version": queries.schema_version(conn),
                }
        except (DatabaseUnavailable, psycopg.Error) as exc:
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return Status(
        mode="external" if settings.database_url else "embedded",
        url=describe(url) if url else None,
        reachable=url is not None and error is None,
        error=error,
        embedded=state,
        postgresql_version=versions.get("postgresql_version"),
        pgvector_version=versions.get("pgvector_version"),
        schema_version=versions.get("schema_version"),
    )
