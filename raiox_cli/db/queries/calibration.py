"""Calibrations: one row per fit, keyed by model id (`raiox calibrate`, reindex)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from raiox_cli.db.queries.feedback import _LATEST, _filters

__all__ = [
    "calibration_gallery",
    "calibrations_exist",
    "confirmed_trust",
    "confirmed_trust_outcomes",
    "latest_calibration",
    "latest_calibration_any",
    "mark_calibrations_stale",
    "save_calibration",
]

_COLUMNS = """id, model_id, target, false_alarm, tta, source, counts, data_sha256, params,
              metrics, stale_at, stale_reason, created_at"""


def save_calibration(
    conn: psycopg.Connection,
    *,
    model_id: str,
    target: float,
    false_alarm: float,
    tta: bool,
    source: str,
    counts: dict[str, Any],
    data_sha256: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""INSERT INTO calibrations (model_id, target, false_alarm, tta, source, counts,
                                          data_sha256, params, metrics)
                VALUES (%(model_id)s, %(target)s, %(false_alarm)s, %(tta)s, %(source)s,
                        %(counts)s, %(data_sha256)s, %(params)s, %(metrics)s)
                RETURNING {_COLUMNS}""",
            {
                "model_id": model_id,
                "target": target,
                "false_alarm": false_alarm,
                "tta": tta,
                "source": source,
                "counts": Jsonb(counts),
                "data_sha256": data_sha256,
                "params": Jsonb(params),
                "metrics": Jsonb(metrics),
            },
        )
        row = cur.fetchone()
        assert row is not None
        return row


def latest_calibration(conn: psycopg.Connection, model_id: str) -> dict[str, Any] | None:
    """The model's latest fit (stale or not), or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""SELECT {_COLUMNS} FROM calibrations WHERE model_id = %(m)s
                ORDER BY id DESC LIMIT 1""",
            {"m": model_id},
        )
        return cur.fetchone()


def latest_calibration_any(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The latest fit of any model (a refit after a switch keeps its target)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM calibrations ORDER BY id DESC LIMIT 1")
        return cur.fetchone()


def calibrations_exist(conn: psycopg.Connection) -> bool:
    """Whether any model was ever calibrated: the nightly reindex refits only then."""
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM calibrations)").fetchone()
    return bool(row and row[0])


def mark_calibrations_stale(conn: psycopg.Connection, reason: str) -> int:
    """A model switch: no calibration holds for the catalogue's new embeddings."""
    cur = conn.execute(
        """UPDATE calibrations SET stale_at = clock_timestamp(), stale_reason = %(r)s
           WHERE stale_at IS NULL""",
        {"r": reason},
    )
    return cur.rowcount


def calibration_gallery(conn: psycopg.Connection, model_id: str) -> list[dict[str, Any]]:
    """Every catalogue image with this model's embedding, its implant and where its
    bytes are: the catalogue calibration searches it in memory, leaving images out."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT im.id, im.implant_id, i.key, im.sha256, im.storage_key, im.source_path,
                      r.path AS root_path, e.embedding
               FROM image_embeddings e JOIN implant_images im ON im.id = e.image_id
                    JOIN implants i ON i.id = im.implant_id
                    LEFT JOIN catalogue_roots r ON r.id = im.root_id
               WHERE e.model_id = %(m)s
               ORDER BY i.key, im.sha256""",
            {"m": model_id},
        )
        return list(cur.fetchall())


def confirmed_trust_outcomes(
    conn: psycopg.Connection, model_id: str, *, since: Any = None
) -> list[dict[str, Any]]:
    """Confirmed analyses answered by this model with their stored trust record
    (the ranked scores the answer came from): the `confirmed` calibration source."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT DISTINCT ON (c.analysis_id) c.analysis_id, c.not_in_catalogue,
                      c.implant_key, a.trust, a.created_at, c.created_at AS confirmed_at
               FROM confirmations c JOIN analyses a ON a.id = c.analysis_id
               WHERE a.status = 'done' AND a.model_id = %(m)s AND a.trust ? 'ranked'
                 AND (%(since)s::timestamptz IS NULL OR a.created_at >= %(since)s::timestamptz)
               ORDER BY c.analysis_id, c.id DESC""",
            {"m": model_id, "since": since},
        )
        return list(cur.fetchall())


def confirmed_trust(
    conn: psycopg.Connection, *, since: Any = None, client: str | None = None
) -> list[dict[str, Any]]:
    """For `eval --confirmed`: each confirmed analysis answered with a calibration,
    its latest confirmation beside the trust fields the answer carried, by month."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""SELECT l.analysis_id, l.not_in_catalogue, l.implant_key, a.trust,
                       to_char(l.analysed_at AT TIME ZONE 'UTC', 'YYYY-MM') AS month
                FROM ({_LATEST}) l JOIN analyses a ON a.id = l.analysis_id
                WHERE l.status = 'done' AND (a.trust ->> 'calibrated')::boolean
                ORDER BY l.analysed_at, l.analysis_id""",
            _filters(since, client),
        )
        return list(cur.fetchall())
