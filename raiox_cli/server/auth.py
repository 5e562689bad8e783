"""Request authentication: who is calling (the operator or a clinic), a shared
token, Standard Webhooks signatures, and a limit on failed attempts per address.

Clinic keys are checked by clients.py (hash lookup); this module only decides.

Standard Webhooks (https://www.standardwebhooks.com): the sender signs
"{webhook-id}.{webhook-timestamp}.{raw body}" with HMAC-SHA256 and sends
`webhook-signature: v1,<base64>` (several, space-separated, during key rotation).
The same scheme signs the notifications this server sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from raiox_cli.db import queries
from raiox_cli.errors import RaioxError

DatabaseRun = Callable[[Callable[[psycopg.Connection], Any]], Any]

TOLERANCE_S = 300  # a delivery older (or newer) than this is a replay, not a retry


class Unauthorized(RaioxError):
    """The request did not prove it comes from a configured sender."""


class TooManyFailures(RaioxError):
    """This address failed to authenticate too often: 429 until the window passes."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed authentications; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Caller:
    """Who a request acts as. `clinic_id` None is the operator (RAIOX_WEBHOOK_TOKEN,
    or a signed delivery): every clinic's analyses. Pass `clinic_id` to the scoped
    queries (queries.find_analysis, list_analyses) as it is."""

    clinic_id: int | None
    name: str  # the clinic's name, or "operator"

    @property
    def is_operator(self) -> bool:
        return self.clinic_id is None


OPERATOR = Caller(None, "operator")


class FailureLimiter:
    """Failed authentications per source address in a sliding window; an address
    over the limit is refused (even with a right key) until old failures age out.
    Kept in PostgreSQL (queries.record_auth_failure), so N servers behind nginx share
    one limit. `run` calls a function with a database connection and commits (the
    server's pool)."""

    def __init__(self, max_failures: int, window_s: float, run: DatabaseRun) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._run = run

    def check(self, address: str) -> None:
        """Raise TooManyFailures while the address is over its limit."""
        count, wait_s = self._run(
            lambda conn: queries.recent_auth_failures(
                conn, address, window_s=self.window_s, limit=self.max_failures
            )
        )
        if count >= self.max_failures:
            raise TooManyFailures(max(1, math.ceil(wait_s)))

    def failed(self, address: str) -> None:
        self._run(lambda conn: queries.record_auth_failure(conn, address, window_s=self.window_s))


def token_matches(expected: str, provided: str | None) -> bool:
    if not provided:
        return False
    return hmac.compare_digest(expected.encode(), provided.encode())


def secret_key(secret: str) -> bytes:
    """`whsec_<base64>` as Standard Webhooks libraries write it; anything else is
    used as raw UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            encoded = secret[len("whsec_") :]
            # Standard Webhooks libraries accept the secret without its = padding.
            return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise RaioxError("RAIOX_WEBHOOK_SECRET starts with whsec_ but is not base64") from None
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secret: str, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


def verify_signature(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> str:
    """Check a delivery's Standard Webhooks headers; returns its webhook-id."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise Unauthorized("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise Unauthorized("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > TOLERANCE_S:
        raise Unauthorized("webhook-timestamp is more than 5 minutes away from now")
    expected = sign(secret, msg_id, timestamp, body).encode()
    for candidate in signatures.split():
        if hmac.compare_digest(expected, candidate.encode()):
            return msg_id
    raise Unauthorized("webhook-signature does not match")
