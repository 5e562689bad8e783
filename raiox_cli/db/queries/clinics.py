"""Clinics (the tenants) and what is scoped to them: keys, analyses by public id,
listing, deletion and retention. Scoping is a WHERE clause here, never a filter
applied in Python afterwards.

`clinic_id=None` in a scoped function means the operator: every clinic's rows.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

# --- clinics ---------------------------------------------------------------------

_CLINIC_COLUMNS = """c.id, c.name, c.notify_url, c.email, c.timezone, c.created_at, c.rotated_at,
                     c.last_used_at, c.revoked_at, c.previous_expires_at"""


def create_clinic(
    conn: psycopg.Connection,
    *,
    name: str,
    key_hash: bytes,
    notify_url: str | None,
    email: str | None,
    timezone: str | None = None,
) -> dict[str, Any] | None:
    """Insert a clinic; None when the name is taken."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""INSERT INTO clinics AS c (name, key_hash, notify_url, email, timezone)
                VALUES (%(name)s, %(hash)s, %(url)s, %(email)s, %(tz)s)
                ON CONFLICT (name) DO NOTHING
                RETURNING {_CLINIC_COLUMNS}""",
            {"name": name, "hash": key_hash, "url": notify_url, "email": email, "tz": timezone},
        )
        return cur.fetchone()


def list_clinics(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every clinic with its analyses count (rows kept now, and those purged)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""SELECT {_CLINIC_COLUMNS},
                       (SELECT count(*) FROM analyses a WHERE a.clinic_id = c.id) AS analyses,
                       (SELECT coalesce(sum(n.analyses), 0)::bigint FROM analysis_counts n
                        WHERE n.clinic_id = c.id) AS purged
                FROM clinics c ORDER BY c.name"""
        )
        return list(cur.fetchall())


def get_clinic(conn: psycopg.Connection, name: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_CLINIC_COLUMNS} FROM clinics c WHERE c.name = %(n)s", {"n": name})
        return cur.fetchone()


def get_clinic_by_id(conn: psycopg.Connection, clinic_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_CLINIC_COLUMNS} FROM clinics c WHERE c.id = %(i)s", {"i": clinic_id})
        return cur.fetchone()


def rotate_clinic_key(
    conn: psycopg.Connection, name: str, *, key_hash: bytes, grace_s: float
) -> dict[str, Any] | None:
    """Make key_hash the clinic's key; the current one keeps working for grace_s
    seconds (a previous key still in its grace period is dropped). None: no such
    active clinic."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""UPDATE clinics AS c SET
                       previous_key_hash = CASE WHEN %(grace)s > 0 THEN c.key_hash END,
                       previous_expires_at = CASE WHEN %(grace)s > 0
                           THEN now() + make_interval(secs => %(grace)s) END,
                       key_hash = %(hash)s, rotated_at = now()
                WHERE c.name = %(name)s AND c.revoked_at IS NULL
                RETURNING {_CLINIC_COLUMNS}""",
            {"name": name, "hash": key_hash, "grace": grace_s},
        )
        return cur.fetchone()


def set_clinic_timezone(
    conn: psycopg.Connection, name: str, timezone: str | None
) -> dict[str, Any] | None:
    """The clinic's time zone (None: the server's); None: no such active clinic."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""UPDATE clinics AS c SET timezone = %(tz)s
                WHERE c.name = %(name)s AND c.revoked_at IS NULL RETURNING {_CLINIC_COLUMNS}""",
            {"name": name, "tz": timezone},
        )
        return cur.fetchone()


def revoke_clinic(conn: psycopg.Connection, name: str) -> dict[str, Any] | None:
    """Revoke every key of the clinic at once; None: no such clinic."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""UPDATE clinics AS c SET revoked_at = coalesce(c.revoked_at, now()),
                       previous_key_hash = NULL, previous_expires_at = NULL
                WHERE c.name = %(name)s RETURNING {_CLINIC_COLUMNS}""",
            {"name": name},
        )
        return cur.fetchone()


def clinic_for_key_hash(conn: psycopg.Connection, key_hash: bytes) -> dict[str, Any] | None:
    """The active clinic whose current key, or previous key within its grace period,
    hashes to key_hash; marks it used (at most once a minute: no write per request)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """WITH hit AS (
                   SELECT id, name, timezone, key_hash FROM clinics
                   WHERE revoked_at IS NULL
                     AND (key_hash = %(h)s
                          OR (previous_key_hash = %(h)s AND previous_expires_at > now()))),
               touched AS (
                   UPDATE clinics c SET last_used_at = now() FROM hit
                   WHERE c.id = hit.id
                     AND (c.last_used_at IS NULL
                          OR c.last_used_at < now() - interval '1 minute'))
               SELECT id, name, timezone, key_hash = %(h)s AS current FROM hit""",
            {"h": key_hash},
        )
        return cur.fetchone()


def notify_url_of_analysis(conn: psycopg.Connection, analysis_id: int) -> str | None:
    """The notification URL of the analysis' clinic, if it has one."""
    row = conn.execute(
        """SELECT c.notify_url FROM analyses a JOIN clinics c ON c.id = a.clinic_id
           WHERE a.id = %(a)s""",
        {"a": analysis_id},
    ).fetchone()
    return row[0] if row else None


def clinic_by_name(conn: psycopg.Connection, name: str) -> int | None:
    """An active clinic's id by its exact name (Jotform shared-form mapping)."""
    row = conn.execute(
        "SELECT id FROM clinics WHERE name = %(n)s AND revoked_at IS NULL", {"n": name}
    ).fetchone()
    return int(row[0]) if row else None


# --- analyses, scoped to a clinic ---------------------------------------------------

ANALYSIS_SELECT = """SELECT a.*, c.name AS clinic, c.timezone AS clinic_timezone FROM analyses a
                     LEFT JOIN clinics c ON c.id = a.clinic_id"""


def find_analysis(
    conn: psycopg.Connection, public_id: uuid.UUID, *, clinic_id: int | None
) -> dict[str, Any] | None:
    """The analysis with this public id, if the caller may see it: any for the
    operator (clinic_id None), else only the clinic's own. Another clinic's
    analysis is None, exactly like a missing one."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            ANALYSIS_SELECT
            + """ WHERE a.public_id = %(p)s
                                    AND (%(c)s::bigint IS NULL OR a.clinic_id = %(c)s)""",
            {"p": public_id, "c": clinic_id},
        )
        return cur.fetchone()


_LIST_ANALYSES = """
    SELECT a.public_id, a.status, a.source, a.client_id, c.name AS clinic,
           a.created_at, a.finished_at,
           m.implant_key AS top_implant, i.name AS top_name, m.score AS top_score
    FROM analyses a
    LEFT JOIN clinics c ON c.id = a.clinic_id
    LEFT JOIN analysis_matches m ON m.analysis_id = a.id AND m.rank = 1
    LEFT JOIN implants i ON i.id = m.implant_id
    WHERE {scope}
      AND (%(status)s::text IS NULL OR a.status = %(status)s)
      AND (%(since)s::timestamptz IS NULL OR a.created_at >= %(since)s)
    ORDER BY a.created_at DESC
    LIMIT %(limit)s"""
# Two fixed statements rather than "(clinic IS NULL OR clinic_id = ...)": once psycopg
# prepares the statement, a generic plan could not use analyses_clinic_idx.
_LIST_OF_CLINIC = _LIST_ANALYSES.format(scope="a.clinic_id = %(c)s")
_LIST_OF_ALL = _LIST_ANALYSES.format(scope="true")


def list_analyses(
    conn: psycopg.Connection,
    *,
    clinic_id: int | None,
    status: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 20,
) -> list[dict[str, Any]]:
    """The caller's analyses (clinic_id None: the operator, all), newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _LIST_OF_ALL if clinic_id is None else _LIST_OF_CLINIC,
            {"c": clinic_id, "status": status, "since": since, "limit": limit},
        )
        return list(cur.fetchall())


def storage_keys_in_use(
    conn: psycopg.Connection, keys: list[str], *, excluding: list[int]
) -> set[str]:
    """Which of these object keys an analysis (other than `excluding`) or a catalogue
    image still refers to (objects are content-addressed: one may serve many rows)."""
    if not keys:
        return set()
    rows = conn.execute(
        """SELECT storage_key FROM analyses
           WHERE storage_key = ANY(%(k)s) AND NOT id = ANY(%(x)s)
           UNION SELECT storage_key FROM implant_images WHERE storage_key = ANY(%(k)s)""",
        {"k": keys, "x": excluding},
    ).fetchall()
    return {r[0] for r in rows}


def lock_old_analyses(
    conn: psycopg.Connection,
    *,
    older_than_s: float,
    clinic_id: int | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Lock (FOR UPDATE) up to `limit` analyses created more than older_than_s ago,
    of one clinic or of all; rows a worker holds right now are skipped."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, public_id, storage_key, clinic_id FROM analyses
               WHERE created_at < now() - make_interval(secs => %(age)s)
                 AND (%(c)s::bigint IS NULL OR clinic_id = %(c)s)
               ORDER BY id LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED""",
            {"age": older_than_s, "c": clinic_id, "limit": limit},
        )
        return list(cur.fetchall())


def old_analyses(
    conn: psycopg.Connection, *, older_than_s: float, clinic_id: int | None = None
) -> list[dict[str, Any]]:
    """Every analysis created more than older_than_s ago (a dry run's count)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, public_id, storage_key, clinic_id FROM analyses
               WHERE created_at < now() - make_interval(secs => %(age)s)
                 AND (%(c)s::bigint IS NULL OR clinic_id = %(c)s)""",
            {"age": older_than_s, "c": clinic_id},
        )
        return list(cur.fetchall())


def lock_analyses(conn: psycopg.Connection, ids: list[int]) -> list[dict[str, Any]]:
    """Lock these analyses for deletion; the ones already gone are left out."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, public_id, storage_key, clinic_id FROM analyses
               WHERE id = ANY(%(ids)s) FOR UPDATE""",
            {"ids": ids},
        )
        return list(cur.fetchall())


def delete_analyses_keeping_counts(conn: psycopg.Connection, ids: list[int]) -> int:
    """Delete these analyses (their matches cascade), adding them to the anonymous
    daily counts first; returns how many were deleted."""
    if not ids:
        return 0
    row = conn.execute(
        """WITH gone AS (DELETE FROM analyses WHERE id = ANY(%(ids)s)
                         RETURNING created_at, clinic_id, source, status),
                counted AS (
                    INSERT INTO analysis_counts AS n (day, clinic_id, source, status, analyses)
                    SELECT (created_at AT TIME ZONE 'UTC')::date, coalesce(clinic_id, 0),
                           source, status, count(*)
                    FROM gone GROUP BY 1, 2, 3, 4
                    ON CONFLICT (day, clinic_id, source, status)
                    DO UPDATE SET analyses = n.analyses + EXCLUDED.analyses)
           SELECT count(*) FROM gone""",
        {"ids": ids},
    ).fetchone()
    return int(row[0]) if row else 0
