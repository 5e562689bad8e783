"""Signed result links: a token that opens one analysis until it expires, so a
notification can carry a link a dentist opens without an API key.

A token is base64url(version | public id (16 bytes) | expiry (uint32, Unix s) |
HMAC-SHA256 of those bytes, first 16 bytes), 50 characters. The key is derived
from the server secret (RAIOX_SECRET_KEY, else RAIOX_HOME/secret.key), so every
server sharing that secret accepts the links of the others. A token that was
altered, truncated or signed with another key is `LinkInvalid` (answer 404); a
genuine one past its expiry is `LinkExpired` (answer 410). Neither says whether
the analysis exists: the route checks that afterwards, and answers 404 alike.

Pages (server/routes/pages.py) serve `/r/<token>`; this module makes and checks
the token, and the links that carry it:

    key = links.link_key(settings)                   # once per process
    token = links.make(key, row["public_id"], settings.result_link_expires_s)
    public_id = links.verify(key, token)             # LinkInvalid -> 404, LinkExpired -> 410
    row = queries.find_analysis(conn, public_id, clinic_id=None)  # None (deleted) -> 404
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import secrets
import struct
import time
import uuid
from pathlib import Path

from raiox_cli.config import Settings
from raiox_cli.errors import RaioxError, UsageError

VERSION = 1
_MAC_BYTES = 16
_BODY = struct.Struct(">B16sI")  # version, public id, expiry
TOKEN_LENGTH = 50  # base64url of 37 bytes, unpadded
MAX_EXPIRY = 2**32 - 1
SECRET_FILE = "secret.key"


class LinkInvalid(RaioxError):
    """Not a token this server signed (tampered, truncated, other key): 404."""


class LinkExpired(RaioxError):
    """A genuine token past its expiry: 410."""


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose from the server secret, so one secret serves several
    uses (result links, DICOM UID replacement) without one revealing another."""
    return hmac.new(secret, b"raiox/" + purpose.encode(), hashlib.sha256).digest()


def server_secret(settings: Settings) -> bytes:
    """RAIOX_SECRET_KEY, else the random secret kept in RAIOX_HOME/secret.key
    (created owner-only on first use). Several machines must share the setting."""
    if settings.secret_key:
        if len(settings.secret_key) < 32:
            raise UsageError("RAIOX_SECRET_KEY is too short: use at least 32 random characters")
        return settings.secret_key.encode()
    path = Path(settings.home) / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise UsageError(f"{path} is not a hex secret; delete it or set RAIOX_SECRET_KEY") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_hex(32)
    try:
        # O_EXCL: of two processes starting together, one writes, the other reads it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(fresh + "\n")
    return bytes.fromhex(fresh)


def link_key(settings: Settings) -> bytes:
    return derive_key(server_secret(settings), "result-link")


def result_path(settings: Settings, public_id: uuid.UUID) -> str:
    """The path of an analysis's result page, `/r/<token>`, valid from now."""
    return f"/r/{make(link_key(settings), public_id, settings.result_link_expires_s)}"


def result_link(settings: Settings, public_id: uuid.UUID) -> tuple[str, dt.datetime] | None:
    """The signed link a notification carries and when it stops working; None
    without RAIOX_PUBLIC_URL (the server cannot know the address people use)."""
    if not settings.public_url:
        return None
    expires_at = int(time.time() + settings.result_link_expires_s)
    token = sign(link_key(settings), public_id, expires_at)
    when = dt.datetime.fromtimestamp(expires_at, dt.timezone.utc)
    return f"{settings.public_url.rstrip('/')}/r/{token}", when


# --- stored images: the signed, expiring path a local store's objects are served by --

_IMAGE_BODY = struct.Struct(">B32sI")  # version, sha256 of the object, expiry
IMAGE_TOKEN_LENGTH = 71  # base64url of 53 bytes, unpadded


def image_key(settings: Settings) -> bytes:
    return derive_key(server_secret(settings), "stored-image")


def sign_image(key: bytes, sha256: str, expires_at: int) -> str:
    """A token that opens the stored object with this sha256 until expires_at, as an
    S3 presigned link does: for a local store, whose file paths mean nothing to a
    client (and would tell it how the server's disk is laid out)."""
    if not 0 < expires_at <= MAX_EXPIRY:
        raise ValueError(f"expiry {expires_at} is outside what a token can carry")
    body = _IMAGE_BODY.pack(VERSION, bytes.fromhex(sha256), expires_at)
    return _encode(body + _mac(key, body))


def verify_image(key: bytes, token: str, *, now: float | None = None) -> str:
    """The sha256 a genuine, unexpired image token carries."""
    body = _genuine(key, token, IMAGE_TOKEN_LENGTH, _IMAGE_BODY.size)
    version, digest, expires_at = _IMAGE_BODY.unpack(body)
    if version != VERSION:
        raise LinkInvalid("not an image link")
    if (time.time() if now is None else now) >= expires_at:
        raise LinkExpired("this image link has expired")
    return digest.hex()


def _genuine(key: bytes, token: str, length: int, body_size: int) -> bytes:
    """The signed body of a token of this shape, or LinkInvalid."""
    if len(token) != length:
        raise LinkInvalid("not a link of this server")
    try:
        raw = base64.urlsafe_b64decode(token + "==")
    except (binascii.Error, ValueError):
        raise LinkInvalid("not a link of this server") from None
    if _encode(raw) != token:  # the spare bits of the last character must be zero
        raise LinkInvalid("not a link of this server")
    body, mac = raw[:body_size], raw[body_size:]
    if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, _mac(key, body)):
        raise LinkInvalid("not a link of this server")
    return body


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]


def sign(key: bytes, public_id: uuid.UUID, expires_at: int) -> str:
    """A token for this analysis valid until expires_at (Unix seconds)."""
    if not 0 < expires_at <= MAX_EXPIRY:
        raise ValueError(f"expiry {expires_at} is outside what a token can carry")
    body = _BODY.pack(VERSION, public_id.bytes, expires_at)
    return _encode(body + _mac(key, body))


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make(key: bytes, public_id: uuid.UUID, ttl_s: float, *, now: float | None = None) -> str:
    """A token valid for ttl_s seconds from now."""
    current = time.time() if now is None else now
    return sign(key, public_id, int(current + ttl_s))


def verify(key: bytes, token: str, *, now: float | None = None) -> uuid.UUID:
    """The public id a genuine, unexpired token carries."""
    if len(token) != TOKEN_LENGTH:
        raise LinkInvalid("not a result link")
    try:
        raw = base64.urlsafe_b64decode(token + "==")
    except (binascii.Error, ValueError):
        raise LinkInvalid("not a result link") from None
    if _encode(raw) != token:  # the spare bits of the last character must be zero
        raise LinkInvalid("not a result link")
    body, mac = raw[: _BODY.size], raw[_BODY.size :]
    if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, _mac(key, body)):
        raise LinkInvalid("not a result link")
    version, public_id, expires_at = _BODY.unpack(body)
    if version != VERSION:
        raise LinkInvalid("not a result link")
    if (time.time() if now is None else now) >= expires_at:
        raise LinkExpired("this result link has expired")
    return uuid.UUID(bytes=public_id)
