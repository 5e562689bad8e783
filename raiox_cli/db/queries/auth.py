"""Failed authentications, shared by every server process (server/auth.py's limiter)."""

from __future__ import annotations

import psycopg


def recent_auth_failures(
    conn: psycopg.Connection, address: str, *, window_s: float, limit: int
) -> tuple[int, float]:
    """How many of the address's last `limit` failures fall inside the window, and
    seconds until the oldest of them leaves it (0 when there is none)."""
    row = conn.execute(
        """SELECT count(*),
                  coalesce(extract(epoch FROM min(failed_at) + make_interval(secs => %(w)s)
                                              - clock_timestamp()), 0)::float8
             FROM (SELECT failed_at FROM auth_failures
                    WHERE address = %(a)s
                      AND failed_at > clock_timestamp() - make_interval(secs => %(w)s)
                    ORDER BY failed_at DESC LIMIT %(n)s) AS recent""",
        {"a": address, "w": window_s, "n": limit},
    ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def record_auth_failure(conn: psycopg.Connection, address: str, *, window_s: float) -> None:
    """One more failure for the address; failures past every window are pruned, so
    the table holds at most a window's worth (a spray from many addresses included)."""
    conn.execute(
        """DELETE FROM auth_failures
            WHERE failed_at <= clock_timestamp() - make_interval(secs => %(w)s)""",
        {"w": window_s},
    )
    conn.execute("INSERT INTO auth_failures (address) VALUES (%(a)s)", {"a": address})
