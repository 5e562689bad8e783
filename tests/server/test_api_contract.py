"""The HTTP API as an integrating developer meets it: the Standard Webhooks reference
library signs deliveries and verifies raiox's notifications, timestamps are UTC with
an explicit offset whatever the machine's and the database session's zones, and the
behaviour bugs found by a contract run stay fixed."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from raiox_cli import utc
from raiox_cli.server import auth
from raiox_cli.server.app import check_auth_configured
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, Site, poll, running

AUTH = {"authorization": f"Bearer {TOKEN}"}
# 24 random bytes: base64 with no padding; 25 bytes: base64 that needs "==".
PADDED = "whsec_" + base64.b64encode(uuid.uuid4().bytes + b"123456789").decode()
UNPADDED = PADDED.rstrip("=")


def test_whsec_secret_without_padding_is_the_same_key(raiox_env: Any) -> None:
    assert PADDED.endswith("=") and UNPADDED != PADDED
    assert auth.secret_key(UNPADDED) == auth.secret_key(PADDED)
    check_auth_configured(raiox_env.replace(webhook_secret=UNPADDED), False)  # no crash


def test_utc_helper() -> None:
    local = dt.datetime(2026, 11, 27, 19, 0, tzinfo=dt.timezone(dt.timedelta(hours=-3)))
    assert utc.iso(local) == "2026-11-27T22:00:00+00:00"
    assert utc.iso(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05+00:00"
    assert utc.now().utcoffset() == dt.timedelta(0)


def test_reference_library_signs_and_verifies_in_a_foreign_time_zone(
    catalogue: Catalogue,
    tiny_embedder: Any,
    site: Site,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The machine in São Paulo, the database session too: answers must still be UTC.
    monkeypatch.setenv("TZ", "America/Sao_Paulo")
    monkeypatch.setenv("PGTZ", "America/Sao_Paulo")
    time.tzset()
    try:
        site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
        sender = Webhook(PADDED)  # a partner signs with the padded form ...
        with running(
            catalogue,
            tiny_embedder,
            webhook_token=TOKEN,
            webhook_secret=UNPADDED,  # ... raiox is configured without padding
            notify_url=site.base + "/notify",
            download_allow_loopback=True,
        ) as base:
            ids = []
            for n in range(2):
                body = json.dumps({"image_url": site.base + "/xray.png", "client_id": f"c{n}"})
                msg_id = f"msg_partner_{n}"
                now = dt.datetime.now(dt.timezone.utc)
                headers = {
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": sender.sign(msg_id, now, body),
                    "content-type": "application/json",
                    **AUTH,
                }
                answer = httpx.post(f"{base}/webhook", content=body, headers=headers)
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
            views = [poll(f"{base}/analyses/{i}", headers=AUTH) for i in ids]
            deadline = time.monotonic() + 20
            while len(site.notifications) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        monkeypatch.undo()
        time.tzset()

    for view in views:
        assert view["status"] == "done"
        for field in ("created_at", "finished_at"):
            assert view[field].endswith("+00:00"), (field, view[field])
    assert len(site.notifications) == 2
    message_ids = set()
    for headers, raw in site.notifications:
        payload = sender.verify(raw, headers)  # the reference library accepts it
        assert payload["timestamp"].endswith("+00:00")
        stamp = dt.datetime.fromisoformat(payload["timestamp"]).timestamp()
        assert abs(stamp - int(headers["webhook-timestamp"])) < 5  # not hours apart
        assert payload["data"]["created_at"].endswith("+00:00")
        # Unique across installations and database resets: the random public id.
        assert headers["webhook-id"] == "msg_" + uuid.UUID(payload["data"]["id"]).hex
        message_ids.add(headers["webhook-id"])
    assert len(message_ids) == 2


def test_skip_past_bigint_is_a_422(catalogue: Catalogue, tiny_embedder: Any) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        for skip in (2**63, 2**64, -1):
            answer = httpx.get(f"{base}/implants", params={"skip": skip}, headers=AUTH)
            assert answer.status_code == 422, (skip, answer.text)
        assert httpx.get(f"{base}/implants", params={"skip": 0}, headers=AUTH).status_code == 200
