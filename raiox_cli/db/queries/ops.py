"""Operations: what metrics and the health check read about the job queue."""

from __future__ import annotations

import psycopg


def queue_depth(conn: psycopg.Connection) -> dict[str, int]:
    """Analyses by status (pending, running, done, failed)."""
    rows = conn.execute("SELECT status, count(*) FROM analyses GROUP BY status").fetchall()
    return {status: int(count) for status, count in rows}


def oldest_due_job_age_s(conn: psycopg.Connection) -> float | None:
    """Seconds since the longest-waiting job became due without a worker taking it:
    pending and due, or running with its lease expired. None when there is none.
    Reads the queue's partial index (next_attempt_at WHERE status IN pending, running)."""
    row = conn.execute(
        """SELECT extract(epoch FROM clock_timestamp() - min(due))::float8
             FROM (SELECT CASE WHEN status = 'pending' THEN next_attempt_at
                               ELSE locked_until END AS due
                     FROM analyses
                    WHERE status IN ('pending', 'running')
                      AND next_attempt_at <= clock_timestamp()) AS jobs
            WHERE due <= clock_timestamp()"""
    ).fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))
