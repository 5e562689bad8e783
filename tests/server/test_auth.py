"""Standard Webhooks signatures and token comparison."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from raiox_cli.server import auth

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_signature_matches_the_standard_webhooks_construction() -> None:
    body = b'{"image_url":"https://example.com/x.png"}'
    headers = auth.signature_headers(SECRET, "msg_1", body, timestamp=1_700_000_000)
    expected = hmac.new(
        b"0123456789abcdef0123456789abcdef", b"msg_1.1700000000." + body, hashlib.sha256
    ).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()
    assert auth.verify_signature(SECRET, headers, body, now=1_700_000_010) == "msg_1"


def test_rotated_keys_any_listed_signature_passes() -> None:
    body = b"{}"
    headers = auth.signature_headers(SECRET, "msg_2", body)
    headers["webhook-signature"] = "v1,bm90LXRoaXMtb25l " + headers["webhook-signature"]
    assert auth.verify_signature(SECRET, headers, body) == "msg_2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"webhook-signature": "v1,AAAA"}, "does not match"),
        ({"webhook-timestamp": -301}, "5 minutes"),  # seconds from now, taken at run time
        ({"webhook-timestamp": 400}, "5 minutes"),
        ({"webhook-timestamp": "soon"}, "not an integer"),
        ({"webhook-id": ""}, "missing"),
    ],
)
def test_bad_signatures_are_refused(change: dict[str, object], message: str) -> None:
    body = b'{"a":1}'
    change = {
        k: str(int(time.time()) + v) if isinstance(v, int) else str(v) for k, v in change.items()
    }
    headers = {**auth.signature_headers(SECRET, "msg_3", body), **change}
    with pytest.raises(auth.Unauthorized, match=message):
        auth.verify_signature(SECRET, headers, body)


def test_body_tampering_is_detected() -> None:
    headers = auth.signature_headers(SECRET, "msg_4", b'{"a":1}')
    with pytest.raises(auth.Unauthorized, match="does not match"):
        auth.verify_signature(SECRET, headers, b'{"a":2}')


def test_plain_secret_is_used_as_bytes_and_bad_whsec_is_an_error() -> None:
    assert auth.secret_key("plain-secret") == b"plain-secret"
    with pytest.raises(Exception, match="not base64"):
        auth.secret_key("whsec_***")


def test_token_compare() -> None:
    assert auth.token_matches("s3cret", "s3cret")
    assert not auth.token_matches("s3cret", "s3cre")
    assert not auth.token_matches("s3cret", None)
    assert not auth.token_matches("s3cret", "")
