"""Timestamps raiox shows anyone: UTC, with an explicit offset, from one place.

PostgreSQL hands timestamptz values back in the session's time zone and
time.strftime uses the machine's; both once leaked local times labelled as UTC.
"""

from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(value: dt.datetime) -> str:
    """`2026-11-27T22:12:26.123456+00:00`; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()
