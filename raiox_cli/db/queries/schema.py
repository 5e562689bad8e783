"""Schema, migrations and the advisory lock keys."""

from __future__ import annotations

import psycopg

MIGRATIONS_LOCK = 7_236_001  # advisory lock keys: arbitrary, fixed, distinct
WRITER_LOCK = 7_236_002

# --- schema and migrations ---------------------------------------------------


def vector_extension_available(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    return row is not None


def create_vector_extension(conn: psycopg.Connection) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def lock_migrations(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATIONS_LOCK,))


def unlock_migrations(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATIONS_LOCK,))


def create_migrations_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer PRIMARY KEY,
               name       text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


def applied_migrations(conn: psycopg.Connection) -> set[int]:
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def record_migration(conn: psycopg.Connection, version: int, name: str) -> None:
    conn.execute(
        "INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)",
        {"version": version, "name": name},
    )


def schema_version(conn: psycopg.Connection) -> int | None:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] if row else None
