"""Signed result links: what a notification carries so a dentist opens a result
without a key. Tampered, foreign and expired tokens are refused."""

from __future__ import annotations

import base64
import os
import stat
import uuid
from pathlib import Path

import pytest

from raiox_cli import config
from raiox_cli.clinics import links

KEY = links.derive_key(b"x" * 32, "result-link")
NOW = 1_800_000_000.0


def test_a_token_carries_the_public_id_until_it_expires() -> None:
    public_id = uuid.uuid4()
    token = links.make(KEY, public_id, 3600, now=NOW)
    assert len(token) == links.TOKEN_LENGTH and token.isascii() and "=" not in token
    assert links.verify(KEY, token, now=NOW) == public_id
    assert links.verify(KEY, token, now=NOW + 3599) == public_id
    with pytest.raises(links.LinkExpired):
        links.verify(KEY, token, now=NOW + 3600)


def test_every_altered_character_is_refused() -> None:
    token = links.make(KEY, uuid.uuid4(), 3600, now=NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, char in enumerate(token):
        other = alphabet[(alphabet.index(char) + 1) % len(alphabet)]
        with pytest.raises(links.LinkInvalid):
            links.verify(KEY, token[:i] + other + token[i + 1 :], now=NOW)


def test_a_longer_expiry_or_another_id_cannot_be_forged() -> None:
    token = links.make(KEY, uuid.uuid4(), 60, now=NOW)
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    raw[17:21] = int(NOW + 10**6).to_bytes(4, "big")  # the expiry, pushed out
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(links.LinkInvalid):
        links.verify(KEY, forged, now=NOW)
    other_key = links.derive_key(b"y" * 32, "result-link")
    with pytest.raises(links.LinkInvalid):
        links.verify(other_key, token, now=NOW)
    # An expired token says so only when it is genuine; a forged one never learns that.
    with pytest.raises(links.LinkInvalid):
        links.verify(other_key, token, now=NOW + 10**7)


@pytest.mark.parametrize("bad", ["", "x", "A" * 50, "A" * 49 + "!", "%" * 50, "A" * 51])
def test_garbage_is_invalid_not_an_error(bad: str) -> None:
    with pytest.raises(links.LinkInvalid):
        links.verify(KEY, bad, now=NOW)


def test_purposes_get_different_keys() -> None:
    assert links.derive_key(b"s" * 32, "result-link") != links.derive_key(b"s" * 32, "dicom")


def test_server_secret_from_setting_or_a_private_file(tmp_path: Path) -> None:
    settings = config.resolve(env={"RAIOX_HOME": str(tmp_path)})
    first = links.server_secret(settings)
    path = tmp_path / links.SECRET_FILE
    assert len(first) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert links.server_secret(settings) == first  # kept, so links survive restarts
    assert links.link_key(settings) == links.derive_key(first, "result-link")
    configured = settings.replace(secret_key="k" * 40)
    assert links.server_secret(configured) == b"k" * 40
    with pytest.raises(Exception, match="too short"):
        links.server_secret(settings.replace(secret_key="short"))
