"""Clinic API keys: generate, hash, verify, rotate, revoke.

A key is `rxk_` + 43 base64url characters (256 random bits). Only its SHA-256 is
stored: with that much randomness a plain hash cannot be reversed or guessed, and
a lookup by hash means the database never sees, and timing never reveals, a key.
The key itself is shown once, when it is made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import zoneinfo
from dataclasses import dataclass
from typing import Any

import psycopg

from raiox_cli.db import queries
from raiox_cli.errors import RaioxError, UsageError

KEY_PREFIX = "rxk_"
KEY_BYTES = 32  # 256 bits
KEY_PATTERN = re.compile(r"^rxk_[A-Za-z0-9_-]{43}$")
DEFAULT_GRACE_S = 24 * 3600
MAX_NAME = 100
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ClinicExists(RaioxError):
    """`clinics add` with a name already taken."""


class ClinicNotFound(RaioxError):
    """No clinic by that name."""


@dataclass(frozen=True)
class Clinic:
    """Who a valid key belongs to."""

    id: int
    name: str
    timezone: str | None = None  # IANA name; None: the server's RAIOX_TIMEZONE


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def looks_like_key(text: str | None) -> bool:
    return bool(text) and KEY_PATTERN.match(text or "") is not None


def check_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned or len(cleaned) > MAX_NAME or any(ord(ch) < 32 for ch in cleaned):
        raise UsageError(
            f"client name {name!r} must be 1 to {MAX_NAME} printable characters, e.g. sorriso-sp"
        )
    return cleaned


def _check_contact(notify_url: str | None, email: str | None) -> None:
    if notify_url is not None and not re.match(r"^https?://[^\s/]+", notify_url):
        raise UsageError(f"--notify-url {notify_url!r} is not an http(s) URL")
    if email is not None and not EMAIL.match(email):
        raise UsageError(f"--email {email!r} is not an e-mail address")


def add(
    conn: psycopg.Connection,
    name: str,
    *,
    notify_url: str | None = None,
    email: str | None = None,
    timezone: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Create a clinic; returns (its row, its key). The key is not stored."""
    name = check_name(name)
    _check_contact(notify_url, email)
    timezone = check_timezone(timezone, "--timezone")
    key = new_key()
    row = queries.create_clinic(
        conn,
        name=name,
        key_hash=key_hash(key),
        notify_url=notify_url,
        email=email,
        timezone=timezone,
    )
    if row is None:
        raise ClinicExists(
            f'a client named {name!r} exists; "raiox clinics rotate" gives it a new key'
        )
    conn.commit()
    return row, key


def check_timezone(name: str | None, what: str) -> str | None:
    """An IANA time zone name (America/Sao_Paulo), checked; None stays None."""
    if name is None:
        return None
    cleaned = name.strip()
    try:
        if not cleaned or len(cleaned) > 64:
            raise ValueError(cleaned)
        zoneinfo.ZoneInfo(cleaned)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise UsageError(
            f"{what} {name!r} is not an IANA time zone; use a name such as America/Sao_Paulo"
        ) from None
    return cleaned


def set_timezone(conn: psycopg.Connection, name: str, timezone: str | None) -> dict[str, Any]:
    """`clinics update --timezone`: the clinic's pages and e-mails show times in it."""
    row = queries.set_clinic_timezone(conn, name, check_timezone(timezone, "--timezone"))
    if row is None:
        raise _missing(conn, name)
    conn.commit()
    return row


def rotate(
    conn: psycopg.Connection, name: str, *, grace_s: float = DEFAULT_GRACE_S
) -> tuple[dict[str, Any], str]:
    """A new key for the clinic; the current one keeps working for grace_s seconds."""
    if grace_s < 0:
        raise UsageError("the grace period cannot be negative")
    key = new_key()
    row = queries.rotate_clinic_key(conn, name, key_hash=key_hash(key), grace_s=grace_s)
    if row is None:
        raise _missing(conn, name)
    conn.commit()
    return row, key


def revoke(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    """Every key of the clinic stops working now. Its analyses stay (see purge)."""
    row = queries.revoke_clinic(conn, name)
    if row is None:
        raise _missing(conn, name)
    conn.commit()
    return row


def find(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    row = queries.get_clinic(conn, name)
    if row is None:
        raise _missing(conn, name)
    return row


def _missing(conn: psycopg.Connection, name: str) -> RaioxError:
    row = queries.get_clinic(conn, name)
    if row is not None and row["revoked_at"] is not None:
        return ClinicNotFound(f"client {name!r} is revoked; add a new client instead")
    return ClinicNotFound(f'no client named {name!r}; see "raiox clinics list"')


def authenticate(conn: psycopg.Connection, key: str) -> Clinic | None:
    """The clinic this key belongs to, or None (unknown, revoked, grace over)."""
    if not looks_like_key(key):
        return None
    digest = key_hash(key)
    row = queries.clinic_for_key_hash(conn, digest)
    conn.commit()
    if row is None:
        return None
    return Clinic(id=int(row["id"]), name=row["name"], timezone=row["timezone"])


def state(row: dict[str, Any]) -> str:
    """active, revoked, or rotating (the old key still works until ...)."""
    if row["revoked_at"] is not None:
        return "revoked"
    expires = row["previous_expires_at"]
    if expires is not None and expires > dt.datetime.now(dt.timezone.utc):
        return f"rotating, old key until {expires:%Y-%m-%d %H:%M %Z}"
    return "active"


def list_rows(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every clinic, without anything secret: hashes never leave the data layer."""
    return queries.list_clinics(conn)
