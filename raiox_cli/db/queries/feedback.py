"""Confirmations: the dentist's answer for an analysis, and what eval, export and
adapt read back from them.

The table is append-only; the latest row (highest id) of an analysis wins. Every
reader below sees only that latest row, through `_LATEST`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

# The latest confirmation of each analysis whose analysis matches the filters.
# Filters are on the analysis (when it was submitted, and the clinic it belongs to
# or the client id its sender labelled it with), so
# picking the latest row first and filtering after gives the same answer.
_LATEST = """
    SELECT DISTINCT ON (c.analysis_id)
           c.id, c.analysis_id, c.not_in_catalogue, c.implant_id, c.implant_key, c.note,
           c.client_id AS confirmed_by, c.created_at AS confirmed_at,
           a.public_id, a.client_id, cl.name AS clinic, a.created_at AS analysed_at,
           a.status, a.model_id, a.image_sha256, a.storage_key
    FROM confirmations c JOIN analyses a ON a.id = c.analysis_id
    LEFT JOIN clinics cl ON cl.id = a.clinic_id
    WHERE (%(since)s::timestamptz IS NULL OR a.created_at >= %(since)s::timestamptz)
      AND (%(client)s::text IS NULL OR %(client)s::text IN (a.client_id, cl.name))
    ORDER BY c.analysis_id, c.id DESC
"""


def _filters(since: datetime | None, client: str | None) -> dict[str, Any]:
    return {"since": since, "client": client}


def implant_by_key(conn: psycopg.Connection, key: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT id, key, name, manufacturer, system FROM implants WHERE key = %(k)s",
            {"k": key},
        )
        return cur.fetchone()


def add_confirmation(
    conn: psycopg.Connection,
    analysis_id: int,
    *,
    implant_id: int | None,
    implant_key: str | None,
    note: str | None = None,
    client_id: str | None = None,
) -> dict[str, Any]:
    """Append a confirmation (implant_key None: not in the catalogue); returns the
    row's id and created_at."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """INSERT INTO confirmations (analysis_id, not_in_catalogue, implant_id, implant_key,
                                          note, client_id)
               VALUES (%(a)s, %(nic)s, %(implant_id)s, %(key)s, %(note)s, %(client)s)
               RETURNING id, created_at""",
            {
                "a": analysis_id,
                "nic": implant_key is None,
                "implant_id": implant_id,
                "key": implant_key,
                "note": note,
                "client": client_id,
            },
        )
        row = cur.fetchone()
        assert row is not None
        return row


def confirmation_history(conn: psycopg.Connection, analysis_id: int) -> list[dict[str, Any]]:
    """Every confirmation of one analysis, latest first, with its implant's names."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT c.id, c.analysis_id, a.public_id, c.not_in_catalogue, c.implant_id,
                      c.implant_key, c.note, c.client_id, c.created_at,
                      i.name, i.manufacturer, i.system
               FROM confirmations c JOIN analyses a ON a.id = c.analysis_id
               LEFT JOIN implants i ON i.id = c.implant_id
               WHERE c.analysis_id = %(a)s ORDER BY c.id DESC""",
            {"a": analysis_id},
        )
        return list(cur.fetchall())


def latest_confirmations(
    conn: psycopg.Connection, *, since: datetime | None = None, client: str | None = None
) -> list[dict[str, Any]]:
    """The latest confirmation of every confirmed analysis (submitted since `since`,
    by `client`: a clinic's name or the client id on the analysis), "not in the
    catalogue" ones included (implant_key None), oldest analysis first; with the
    analysis's stored image and its implant's names."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""SELECT l.*, i.name, i.manufacturer, i.system
                FROM ({_LATEST}) l LEFT JOIN implants i ON i.id = l.implant_id
                ORDER BY l.analysed_at, l.analysis_id""",
            _filters(since, client),
        )
        return list(cur.fetchall())


def confirmed_query_images(
    conn: psycopg.Connection, *, since: datetime | None = None, client: str | None = None
) -> list[dict[str, Any]]:
    """Labelled real X-rays for training and export: (implant_key, image_sha256,
    storage_key) of every analysis whose latest confirmation names a catalogue
    implant and whose X-ray is in the image store; one row per (implant, image)
    even when the same X-ray was analysed twice. Also: implant_id (None if the
    implant has since left the catalogue), name and manufacturer (None then too),
    analysis_id and public_id (of the first such analysis), confirmed_at.
    Read the bytes with storage.open_store(settings).get(storage_key)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""SELECT DISTINCT ON (l.implant_key, l.image_sha256)
                       l.implant_key, l.implant_id, l.image_sha256, l.storage_key,
                       l.analysis_id, l.public_id, l.confirmed_at, i.name, i.manufacturer
                FROM ({_LATEST}) l LEFT JOIN implants i ON i.id = l.implant_id
                WHERE NOT l.not_in_catalogue AND l.storage_key IS NOT NULL
                ORDER BY l.implant_key, l.image_sha256, l.analysis_id""",
            _filters(since, client),
        )
        return list(cur.fetchall())


def confirmed_outcomes(
    conn: psycopg.Connection, *, since: datetime | None = None, client: str | None = None
) -> list[dict[str, Any]]:
    """For `eval --confirmed`: each finished analysis's latest confirmation beside
    the answer raiox gave then (its stored matches: keys and scores, best first),
    the confirmed implant's manufacturer and the month the analysis was made."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""SELECT l.analysis_id, l.public_id, l.not_in_catalogue, l.implant_key, l.model_id,
                       l.analysed_at, l.client_id,
                       to_char(l.analysed_at AT TIME ZONE 'UTC', 'YYYY-MM') AS month,
                       coalesce(i.manufacturer, split_part(l.implant_key, '/', 1))
                           AS manufacturer,
                       coalesce(array_agg(m.implant_key ORDER BY m.rank)
                                    FILTER (WHERE m.rank IS NOT NULL), '{{}}') AS ranked,
                       coalesce(array_agg(m.score ORDER BY m.rank)
                                    FILTER (WHERE m.rank IS NOT NULL), '{{}}') AS scores
                FROM ({_LATEST}) l
                LEFT JOIN implants i ON i.id = l.implant_id
                LEFT JOIN analysis_matches m ON m.analysis_id = l.analysis_id
                WHERE l.status = 'done'
                GROUP BY l.analysis_id, l.public_id, l.not_in_catalogue, l.implant_key, l.model_id,
                         l.analysed_at, l.client_id, i.manufacturer
                ORDER BY l.analysed_at, l.analysis_id""",
            _filters(since, client),
        )
        return list(cur.fetchall())
