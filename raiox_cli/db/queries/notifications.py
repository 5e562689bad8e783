"""Notifications of finished analyses: one queue for every channel (webhook, e-mail).

A row per (analysis, channel). Claiming bumps `attempts` and leases the row until
`locked_until`, like the job queue, so a worker that dies leaves it to another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row


def request_notifications(
    conn: psycopg.Connection, analysis_id: int, recipients: Mapping[str, str | None]
) -> None:
    """Queue one delivery per channel ({channel: recipient}); an existing row for
    that channel is queued again (a job that finished twice notifies twice)."""
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO notifications (analysis_id, channel, recipient)
               VALUES (%(a)s, %(channel)s, %(recipient)s)
               ON CONFLICT (analysis_id, channel) DO UPDATE
               SET recipient = EXCLUDED.recipient, status = 'pending', attempts = 0,
                   error = NULL, next_attempt_at = now(), locked_until = NULL, sent_at = NULL""",
            [
                {"a": analysis_id, "channel": channel, "recipient": recipient}
                for channel, recipient in recipients.items()
            ],
        )


def claim_next_notification(
    conn: psycopg.Connection, *, channels: list[str], lease_s: float
) -> dict[str, Any] | None:
    """Take the oldest due delivery of one of `channels`."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """UPDATE notifications n SET attempts = n.attempts + 1,
                      locked_until = now() + make_interval(secs => %(lease)s)
               FROM (SELECT analysis_id, channel FROM notifications
                     WHERE status = 'pending' AND next_attempt_at <= now()
                       AND channel = ANY(%(channels)s)
                       AND (locked_until IS NULL OR locked_until < now())
                     ORDER BY next_attempt_at, analysis_id
                     LIMIT 1 FOR UPDATE SKIP LOCKED) due
               WHERE n.analysis_id = due.analysis_id AND n.channel = due.channel
               RETURNING n.analysis_id, n.channel, n.recipient, n.attempts,
                         (SELECT public_id FROM analyses WHERE id = n.analysis_id) AS public_id""",
            {"lease": lease_s, "channels": channels},
        )
        return cur.fetchone()


def notification_sent(conn: psycopg.Connection, analysis_id: int, channel: str) -> None:
    """Delivered. `error` keeps the last refusal, if any: why it took several attempts."""
    conn.execute(
        """UPDATE notifications SET status = 'sent', locked_until = NULL, sent_at = now()
           WHERE analysis_id = %(a)s AND channel = %(c)s""",
        {"a": analysis_id, "c": channel},
    )


def notification_retry(
    conn: psycopg.Connection, analysis_id: int, channel: str, *, error: str, delay_s: float
) -> None:
    conn.execute(
        """UPDATE notifications SET error = %(error)s, locked_until = NULL,
                  next_attempt_at = now() + make_interval(secs => %(delay)s)
           WHERE analysis_id = %(a)s AND channel = %(c)s""",
        {"a": analysis_id, "c": channel, "error": error, "delay": delay_s},
    )


def notification_failed(
    conn: psycopg.Connection, analysis_id: int, channel: str, *, error: str
) -> None:
    conn.execute(
        """UPDATE notifications SET status = 'failed', error = %(error)s, locked_until = NULL
           WHERE analysis_id = %(a)s AND channel = %(c)s""",
        {"a": analysis_id, "c": channel, "error": error},
    )


def notifications_of(conn: psycopg.Connection, analysis_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT channel, recipient, status, attempts, error, sent_at
               FROM notifications WHERE analysis_id = %(a)s ORDER BY channel""",
            {"a": analysis_id},
        )
        return list(cur.fetchall())


def email_recipient(conn: psycopg.Connection, analysis_id: int) -> str | None:
    """Who is told by e-mail: the submitter's own address (a Jotform e-mail answer),
    else the clinic's (`raiox clinics add --email`)."""
    row = conn.execute(
        """SELECT coalesce(a.reply_email, c.email) FROM analyses a
           LEFT JOIN clinics c ON c.id = a.clinic_id AND c.revoked_at IS NULL
           WHERE a.id = %(a)s""",
        {"a": analysis_id},
    ).fetchone()
    return row[0] if row else None
