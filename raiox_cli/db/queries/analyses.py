"""Analyses: submitted X-rays, the server's job queue, catalogue browsing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# --- analyses (submitted X-rays; also the server's job queue) ------------------


def create_analysis(
    conn: psycopg.Connection,
    *,
    source: str,
    client_id: str | None = None,
    idempotency_key: str | None = None,
    image_url: str | None = None,
    image_sha256: str | None = None,
    storage_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    status: str = "pending",
    clinic_id: int | None = None,
    lang: str | None = None,
    reply_email: str | None = None,
    crop: Sequence[int] | None = None,
) -> tuple[int, bool]:
    """Record a submitted X-ray; returns (id, created). A repeated idempotency key
    returns the existing analysis with created=False. Keys are per clinic: another
    clinic sending the same delivery id gets its own analysis, never this one."""
    if idempotency_key is not None and clinic_id is not None:
        idempotency_key = f"clinic-{clinic_id}:{idempotency_key}"
    params = {
        "source": source,
        "client_id": client_id,
        "clinic_id": clinic_id,
        "key": idempotency_key,
        "image_url": image_url,
        "sha": image_sha256,
        "storage_key": storage_key,
        "metadata": psycopg.types.json.Jsonb(metadata or {}),
        "status": status,
        "lang": lang,
        "reply_email": reply_email,
        "crop": list(crop) if crop else None,
    }
    row = conn.execute(
        """INSERT INTO analyses (source, client_id, clinic_id, idempotency_key, image_url,
                                 image_sha256, storage_key, metadata, status, lang,
                                 reply_email, crop)
           VALUES (%(source)s, %(client_id)s, %(clinic_id)s, %(key)s, %(image_url)s, %(sha)s,
                   %(storage_key)s, %(metadata)s, %(status)s, %(lang)s, %(reply_email)s,
                   %(crop)s)
           ON CONFLICT (idempotency_key) DO NOTHING
           RETURNING id""",
        params,
    ).fetchone()
    if row is not None:
        return int(row[0]), True
    existing = conn.execute(
        "SELECT id FROM analyses WHERE idempotency_key = %(key)s", params
    ).fetchone()
    assert existing is not None
    return int(existing[0]), False


def finish_analysis(
    conn: psycopg.Connection,
    analysis_id: int,
    *,
    model_id: str,
    matches: Sequence[Any],
    trust: dict[str, Any] | None = None,
) -> None:
    """Store the ranked matches (objects with rank, implant_id, image_id, key, score)
    and the answer's trust fields (calibrate.Trust), and mark the analysis done,
    replacing matches of an earlier attempt."""
    conn.execute("DELETE FROM analysis_matches WHERE analysis_id = %(a)s", {"a": analysis_id})
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO analysis_matches (analysis_id, rank, implant_id, image_id,
                                             implant_key, score)
               VALUES (%(a)s, %(rank)s, %(implant)s, %(image)s, %(key)s, %(score)s)""",
            [
                {
                    "a": analysis_id,
                    "rank": m.rank,
                    "implant": m.implant_id,
                    "image": m.image_id,
                    "key": m.key,
                    "score": m.score,
                }
                for m in matches
            ],
        )
    conn.execute(
        # clock_timestamp(): now() is the transaction's start, before the embedding ran.
        """UPDATE analyses SET status = 'done', model_id = %(m)s, error = NULL,
                  updated_at = clock_timestamp(), finished_at = clock_timestamp(),
                  locked_until = NULL, trust = %(trust)s
           WHERE id = %(a)s""",
        {"a": analysis_id, "m": model_id, "trust": Jsonb(trust) if trust is not None else None},
    )


def get_analysis(conn: psycopg.Connection, analysis_id: int) -> dict[str, Any] | None:
    """An analysis by its internal id, unscoped (workers, tests); requests use
    queries.find_analysis, which is scoped to the caller's clinic."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT a.*, c.name AS clinic, c.timezone AS clinic_timezone FROM analyses a
               LEFT JOIN clinics c ON c.id = a.clinic_id WHERE a.id = %(a)s""",
            {"a": analysis_id},
        )
        return cur.fetchone()


def analysis_matches(conn: psycopg.Connection, analysis_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT m.rank, m.implant_id, m.image_id, m.implant_key, m.score,
                      i.name, i.manufacturer, i.system, i.diameter_mm, i.length_mm,
                      i.connection, im.storage_key
               FROM analysis_matches m
               LEFT JOIN implants i ON i.id = m.implant_id
               LEFT JOIN implant_images im ON im.id = m.image_id
               WHERE m.analysis_id = %(a)s ORDER BY m.rank""",
            {"a": analysis_id},
        )
        return list(cur.fetchall())


# --- server job queue and catalogue browsing (serve-webhook-minimal) -----------
# A job is an analyses row. Claiming sets status 'running', bumps `attempts` and
# leases the row until `locked_until`; a worker that dies leaves the lease to
# expire and another claims the row again. Every later write names the attempt it
# claimed, so a worker whose lease was taken over cannot overwrite the new owner.
# Notifications of a finished analysis have their own queue (queries/notifications.py).


def claim_next_job(conn: psycopg.Connection, *, lease_s: float) -> dict[str, Any] | None:
    """Take the oldest due job (pending, or running with an expired lease)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """UPDATE analyses SET status = 'running', attempts = attempts + 1,
                      locked_until = now() + make_interval(secs => %(lease)s),
                      updated_at = now()
               WHERE id = (SELECT id FROM analyses
                           WHERE status IN ('pending', 'running')
                             AND next_attempt_at <= now()
                             AND (status = 'pending' OR locked_until < now())
                           ORDER BY next_attempt_at, id
                           LIMIT 1 FOR UPDATE SKIP LOCKED)
               RETURNING id, public_id, clinic_id, source, client_id, image_url,
                         image_sha256, storage_key, metadata, attempts, crop""",
            {"lease": lease_s},
        )
        return cur.fetchone()


def claim_due_jobs(conn: psycopg.Connection, *, lease_s: float, limit: int) -> list[dict[str, Any]]:
    """`claim_next_job` for up to `limit` due jobs at once (a batching worker), oldest
    first; each gets its own attempt and lease, exactly as if claimed one by one."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """UPDATE analyses SET status = 'running', attempts = attempts + 1,
                      locked_until = now() + make_interval(secs => %(lease)s),
                      updated_at = now()
               WHERE id IN (SELECT id FROM analyses
                            WHERE status IN ('pending', 'running')
                              AND next_attempt_at <= now()
                              AND (status = 'pending' OR locked_until < now())
                            ORDER BY next_attempt_at, id
                            LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
               RETURNING id, public_id, clinic_id, source, client_id, image_url,
                         image_sha256, storage_key, metadata, attempts, crop, next_attempt_at""",
            {"lease": lease_s, "limit": limit},
        )
        jobs = list(cur.fetchall())
    jobs.sort(key=lambda job: (job["next_attempt_at"], job["id"]))
    for job in jobs:
        del job["next_attempt_at"]
    return jobs


def lock_claimed_job(conn: psycopg.Connection, analysis_id: int, attempt: int) -> bool:
    """Lock the row for the final write; False when the lease went to another worker."""
    row = conn.execute(
        """SELECT 1 FROM analyses WHERE id = %(a)s AND status = 'running'
                                   AND attempts = %(n)s FOR UPDATE""",
        {"a": analysis_id, "n": attempt},
    ).fetchone()
    return row is not None


def record_analysis_image(
    conn: psycopg.Connection, analysis_id: int, *, sha256: str, storage_key: str
) -> bool:
    """Name the stored image on its analysis; False when the analysis is gone (deleted
    while its image downloaded: the object is left to the orphan sweep)."""
    row = conn.execute(
        """UPDATE analyses SET image_sha256 = %(sha)s, storage_key = %(key)s, updated_at = now()
           WHERE id = %(a)s RETURNING id""",
        {"a": analysis_id, "sha": sha256, "key": storage_key},
    ).fetchone()
    return row is not None


def retry_job(
    conn: psycopg.Connection, analysis_id: int, attempt: int, *, error: str, delay_s: float
) -> bool:
    row = conn.execute(
        """UPDATE analyses SET status = 'pending', error = %(error)s, locked_until = NULL,
                  next_attempt_at = now() + make_interval(secs => %(delay)s), updated_at = now()
           WHERE id = %(a)s AND status = 'running' AND attempts = %(n)s RETURNING id""",
        {"a": analysis_id, "n": attempt, "error": error, "delay": delay_s},
    ).fetchone()
    return row is not None


def fail_job(
    conn: psycopg.Connection,
    analysis_id: int,
    attempt: int,
    *,
    error: str,
    error_kind: str | None = None,
) -> bool:
    row = conn.execute(
        """UPDATE analyses SET status = 'failed', error = %(error)s, error_kind = %(kind)s,
                  locked_until = NULL, updated_at = clock_timestamp(),
                  finished_at = clock_timestamp()
           WHERE id = %(a)s AND status = 'running' AND attempts = %(n)s RETURNING id""",
        {"a": analysis_id, "n": attempt, "error": error, "kind": error_kind},
    ).fetchone()
    return row is not None


def release_job(conn: psycopg.Connection, analysis_id: int, attempt: int) -> bool:
    """Give an unfinished job back (graceful shutdown); the attempt does not count."""
    row = conn.execute(
        """UPDATE analyses SET status = 'pending', attempts = attempts - 1,
                  locked_until = NULL, next_attempt_at = now(), updated_at = now()
           WHERE id = %(a)s AND status = 'running' AND attempts = %(n)s RETURNING id""",
        {"a": analysis_id, "n": attempt},
    ).fetchone()
    return row is not None


def count_pending_jobs(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM analyses WHERE status IN ('pending', 'running')"
    ).fetchone()
    return int(row[0]) if row else 0


def ping(conn: psycopg.Connection) -> None:
    conn.execute("SELECT 1")


# One filter for a page of the catalogue and its total: of one manufacturer (any case),
# holding every word in its key or name. Constant SQL: the values are parameters.
_IMPLANT_FILTER = """(%(manufacturer)s::text IS NULL OR lower(i.manufacturer) = %(manufacturer)s)
    AND (SELECT coalesce(bool_and(strpos(lower(i.key || ' ' || i.name), w) > 0), true)
         FROM unnest(%(words)s::text[]) AS w)"""
_LIST_IMPLANTS = (
    """SELECT i.id, i.key, i.name, i.manufacturer, i.system, i.diameter_mm,
              i.length_mm, i.connection,
              (SELECT count(*) FROM implant_images im WHERE im.implant_id = i.id) AS images
       FROM implants i WHERE """
    + _IMPLANT_FILTER
    + " ORDER BY i.id OFFSET %(skip)s LIMIT %(limit)s"
)
_COUNT_IMPLANTS = "SELECT count(*) FROM implants i WHERE " + _IMPLANT_FILTER


def _implant_filter(manufacturer: str | None, words: Sequence[str]) -> dict[str, Any]:
    return {
        "manufacturer": manufacturer.strip().lower() if manufacturer else None,
        "words": [w.lower() for w in words],
    }


def list_implants(
    conn: psycopg.Connection,
    *,
    skip: int,
    limit: int,
    manufacturer: str | None = None,
    words: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """A page of the catalogue (GET /implants, raiox implants), filtered when asked."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _LIST_IMPLANTS,
            {"skip": skip, "limit": limit, **_implant_filter(manufacturer, words)},
        )
        return list(cur.fetchall())


def count_implants_matching(
    conn: psycopg.Connection, *, manufacturer: str | None = None, words: Sequence[str] = ()
) -> int:
    row = conn.execute(_COUNT_IMPLANTS, _implant_filter(manufacturer, words)).fetchone()
    return int(row[0]) if row else 0


def get_implant(conn: psycopg.Connection, implant_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, key, name, manufacturer, system, diameter_mm, length_mm, connection,
                      notes, extra, created_at, updated_at
               FROM implants WHERE id = %(i)s""",
            {"i": implant_id},
        )
        return cur.fetchone()


def implant_images_of(conn: psycopg.Connection, implant_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, sha256, storage_key, format, width, height
               FROM implant_images WHERE implant_id = %(i)s ORDER BY id""",
            {"i": implant_id},
        )
        return list(cur.fetchall())
