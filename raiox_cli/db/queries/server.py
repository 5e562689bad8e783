"""What the PostgreSQL server itself says about its version and extensions."""

from __future__ import annotations

import psycopg


def server_version(conn: psycopg.Connection) -> str:
    return conn.execute("SHOW server_version").fetchone()[0]


def pgvector_version(conn: psycopg.Connection) -> str | None:
    """The installed pgvector in this database, else the version the server offers."""
    row = conn.execute(
        """SELECT coalesce(
               (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
               (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'))"""
    ).fetchone()
    return row[0] if row else None
