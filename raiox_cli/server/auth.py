"""Request authentication: a shared token and Standard Webhooks signatures.

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
import time
from collections.abc import Mapping

from raiox_cli.errors import RaioxError

TOLERANCE_S = 300  # a delivery older (or newer) than this is a replay, not a retry


class Unauthorized(RaioxError):
    """The request did not prove it comes from a configured sender."""


def token_matches(expected: str, provided: str | None) -> bool:
    if not provided:
        return False
    return hmac.compare_digest(expected.encode(), provided.encode())


def secret_key(secret: str) -> bytes:
    """`whsec_<base64>` as Standard Webhooks libraries write it; anything else is
    used as raw UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
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
