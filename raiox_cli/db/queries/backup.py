"""Snapshots and fingerprints for backup, restore and verify: every table, by name
from the catalogue (never from input), so tables added later are covered too."""

from __future__ import annotations

import psycopg
from psycopg import sql


def export_snapshot(conn: psycopg.Connection) -> str:
    """The id pg_dump --snapshot takes, so the dump sees what this transaction sees."""
    return conn.execute("SELECT pg_export_snapshot()").fetchone()[0]


def user_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
             AND NOT EXISTS (SELECT 1 FROM pg_depend d  -- tables an extension owns
                             WHERE d.objid = c.oid AND d.deptype = 'e')
           ORDER BY c.relname"""
    )
    return [row[0] for row in rows]


def table_fingerprint(conn: psycopg.Connection, table: str) -> tuple[int, str]:
    """Row count and an order-independent md5 of the rows' text (UTC timestamps)."""
    conn.execute("SET LOCAL TIME ZONE 'UTC'")
    query = sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') "
        "FROM (SELECT md5(t::text) AS h FROM {} AS t) AS rows"
    ).format(sql.Identifier("public", table))
    count, digest = conn.execute(query).fetchone()
    return count, digest


def table_has_rows(conn: psycopg.Connection, table: str) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier("public", table))
    return conn.execute(query).fetchone()[0]


def reset_public_schema(conn: psycopg.Connection) -> None:
    """Drop everything in the public schema (the vector extension included)."""
    conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
    conn.execute("CREATE SCHEMA public")


def referenced_storage_keys(conn: psycopg.Connection) -> set[str]:
    """Every object key a row names (analyses and catalogue images): what the
    orphan sweep must keep."""
    rows = conn.execute(
        """SELECT storage_key FROM analyses WHERE storage_key IS NOT NULL
           UNION SELECT storage_key FROM implant_images WHERE storage_key IS NOT NULL"""
    ).fetchall()
    return {r[0] for r in rows}
