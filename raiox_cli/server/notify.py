"""Push a finished analysis to RAIOX_NOTIFY_URL, signed with Standard Webhooks
headers so the receiver can check it came from us and drop replays."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import httpx

from raiox_cli import utc
from raiox_cli.errors import RaioxError
from raiox_cli.server import auth

TIMEOUT_S = 10.0
TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


class NotifyFailed(RaioxError):
    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def message_id(public_id: str) -> str:
    """Stable across retries (the receiver dedupes on webhook-id) and unique across
    installations and database resets: the analysis's random public id, never the
    internal counter that restarts at 1 on every new database."""
    return f"msg_{uuid.UUID(str(public_id)).hex}"


def payload(result: dict[str, Any]) -> bytes:
    kind = "analysis.completed" if result["status"] == "done" else "analysis.failed"
    body = {"type": kind, "timestamp": utc.iso(utc.now()), "data": result}
    return json.dumps(body, default=_encode, separators=(",", ":")).encode()


def _encode(value: Any) -> Any:
    return utc.iso(value) if isinstance(value, dt.datetime) else str(value)


def send(url: str, secret: str, public_id: str, body: bytes) -> None:
    headers = auth.signature_headers(secret, message_id(public_id), body)
    headers["content-type"] = "application/json"
    try:
        # The URL is the operator's own setting, not submitted input, so it is not
        # put through the SSRF checks; no proxies from the environment, no redirects.
        with httpx.Client(timeout=TIMEOUT_S, trust_env=False, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise NotifyFailed(
            f"notification not delivered: {type(exc).__name__}", transient=True
        ) from None
    if not 200 <= response.status_code < 300:
        raise NotifyFailed(
            f"notification answered HTTP {response.status_code}",
            transient=response.status_code in TRANSIENT_STATUS or response.status_code >= 500,
        )
