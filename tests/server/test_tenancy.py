"""Clinics as tenants over real HTTP: each clinic's key sees only its analyses
(another clinic's is a 404 like a missing one), revoked and rotated keys, keys kept
out of logs, guessing rate-limited, Jotform per clinic and on a shared form."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from raiox_cli import db
from raiox_cli.clinics import keys as clients
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import FORM_ID, SECRET, TOKEN, Site, jotform_fields, poll, running


def add_clinic(cat: Catalogue, name: str) -> str:
    with db.connect(cat.settings) as conn:
        return clients.add(conn, name)[1]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def upload(base: str, key: str, png: bytes) -> dict[str, Any]:
    answer = httpx.post(
        f"{base}/upload",
        files={"file": ("q.png", png, "image/png")},
        headers=bearer(key),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_clinic_sees_only_its_own_analyses(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, capsys: pytest.CaptureFixture
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    key_a, key_b = add_clinic(catalogue, "clinic-a"), add_clinic(catalogue, "clinic-b")
    with running(
        catalogue, tiny_embedder, webhook_token=TOKEN, download_allow_loopback=True
    ) as base:
        mine = upload(base, key_a, catalogue.query_png)
        assert mine["clinic"] == "clinic-a" and uuid.UUID(mine["id"]).version == 4
        # The same delivery id from two clinics: two analyses, never the other's.
        delivery = {"image_url": site.base + "/xray.png"}
        hook = f"{base}/webhook"
        theirs = httpx.post(
            hook,
            params={"wait": 20},
            json=delivery,
            headers={"x-raiox-key": key_b, "idempotency-key": "d-1"},
            timeout=30,
        ).json()
        again_a = httpx.post(
            hook, params={"key": key_a}, json=delivery, headers={"idempotency-key": "d-1"}
        ).json()
        assert theirs["status"] == "done" and theirs["clinic"] == "clinic-b"
        assert again_a["id"] not in (theirs["id"], mine["id"]) and not again_a["replayed"]
        poll(f"{base}/analyses/{again_a['id']}", headers=bearer(key_a))

        def get(public_id: str, key: str) -> httpx.Response:
            return httpx.get(f"{base}/analyses/{public_id}", headers=bearer(key))

        read = get(mine["id"], key_a).json()["matches"]
        assert [m["implant_id"] for m in read] == [m["implant_id"] for m in mine["matches"]]
        missing = get(str(uuid.uuid4()), key_b)
        other = get(mine["id"], key_b)
        assert (
            (other.status_code, other.json())
            == (404, missing.json())
            == (
                404,
                {
                    "error": {"code": "not_found", "message": "no such analysis"},
                    "detail": "no such analysis",
                },
            )
        )
        assert get(theirs["id"], key_a).status_code == 404
        # Nothing to count: internal integers and anything not a UUID are 404 too.
        for guess in ("1", "2", "3", "0", "-1", mine["id"][:-1], "x" * 36):
            assert get(guess, key_b).status_code == 404
        confirm = {"implant_key": mine["matches"][0]["key"]}
        feedback = f"{base}/analyses/{mine['id']}/feedback"
        assert httpx.post(feedback, json=confirm, headers=bearer(key_b)).status_code == 404
        confirmed = httpx.post(feedback, json=confirm, headers=bearer(key_a))
        assert confirmed.status_code == 201 and confirmed.json()["analysis_id"] == mine["id"]
        assert get(mine["id"], TOKEN).status_code == 200  # the operator sees everything
        assert get(theirs["id"], TOKEN).json()["clinic"] == "clinic-b"

        def listed(key: str, **params: Any) -> list[str]:
            answer = httpx.get(f"{base}/analyses", params=params, headers=bearer(key))
            assert answer.status_code == 200, answer.text
            return [item["id"] for item in answer.json()["items"]]

        assert listed(key_a) == [again_a["id"], mine["id"]]  # newest first
        assert listed(key_b) == [theirs["id"]]
        assert set(listed(TOKEN)) == {mine["id"], theirs["id"], again_a["id"]}
        assert listed(key_a, limit=1) == [again_a["id"]]
        assert listed(key_a, status="failed") == []
        assert listed(key_a, since="2999-01-01T00:00:00Z") == []
        assert listed(key_a, since="2000-01-01T00:00:00") == [again_a["id"], mine["id"]]
        bad = httpx.get(f"{base}/analyses", params={"status": "x"}, headers=bearer(key_a))
        assert bad.status_code == 422
        item = httpx.get(f"{base}/analyses", headers=bearer(key_b)).json()["items"][0]
        assert item["url"] == f"{base}/v1/analyses/{theirs['id']}" and item["status"] == "done"
        assert "id" in item and item["top_implant"] and "public_id" not in item

        # The catalogue stays readable with any clinic's key.
        assert httpx.get(f"{base}/implants", headers=bearer(key_b)).status_code == 200
    logged = capsys.readouterr().err
    for key in (key_a, key_b, TOKEN):
        assert key not in logged and key[4:20] not in logged
    assert f'"action": "read", "client": "clinic-a", "analysis": "{mine["id"]}"' in logged
    assert '"action": "create", "client": "clinic-b"' in logged


def test_revoked_is_401_at_once_and_rotation_has_a_grace_period(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    key = add_clinic(catalogue, "rotating")
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:

        def status(k: str) -> int:
            return httpx.get(f"{base}/analyses", headers=bearer(k)).status_code

        assert status(key) == 200
        with db.connect(catalogue.settings) as conn:
            _, new = clients.rotate(conn, "rotating", grace_s=1.5)
        assert (status(key), status(new)) == (200, 200)
        time.sleep(1.7)
        assert (status(key), status(new)) == (401, 200)
        with db.connect(catalogue.settings) as conn:
            clients.revoke(conn, "rotating")
        assert status(new) == 401
        assert httpx.get(f"{base}/analyses", params={"key": new}).status_code == 401


def test_guessing_keys_is_rate_limited_per_address(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    key = add_clinic(catalogue, "limited")
    with running(catalogue, tiny_embedder, webhook_token=TOKEN, auth_max_failures=3) as base:

        def attempt(k: str, address: str) -> httpx.Response:
            # uvicorn trusts X-Forwarded-For from loopback, as from nginx in production.
            return httpx.get(
                f"{base}/analyses",
                headers={**bearer(k), "x-forwarded-for": address},
            )

        guesses = [attempt(clients.new_key(), "203.0.113.5") for _ in range(3)]
        assert [r.status_code for r in guesses] == [401, 401, 401]
        blocked = attempt(key, "203.0.113.5")  # even the right key, while blocked
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
        assert attempt("wrong-token", "203.0.113.5").status_code == 429
        assert attempt(key, "203.0.113.6").status_code == 200  # other addresses unaffected


def test_the_limit_is_shared_by_every_server_on_the_database(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    """Two servers behind one proxy, one database: failures on either count toward
    one limit (kept in PostgreSQL), not one limit per process."""
    key = add_clinic(catalogue, "shared-limit")
    options = {"webhook_token": TOKEN, "auth_max_failures": 4}
    with (
        running(catalogue, tiny_embedder, **options) as first,
        running(catalogue, tiny_embedder, **options) as second,
    ):

        def attempt(base: str, k: str) -> int:
            headers = {**bearer(k), "x-forwarded-for": "198.51.100.7"}
            return httpx.get(f"{base}/analyses", headers=headers).status_code

        assert [attempt(first, "wrong") for _ in range(2)] == [401, 401]
        assert [attempt(second, "wrong") for _ in range(2)] == [401, 401]
        assert attempt(first, key) == 429 and attempt(second, key) == 429
        with db.connect(catalogue.settings) as conn:
            rows = conn.execute(
                "SELECT count(*) FROM auth_failures WHERE address = '198.51.100.7'"
            ).fetchone()
        assert rows is not None and rows[0] == 4


def test_jotform_per_clinic_url_and_shared_form_mapping(
    catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    image_url = site.base + "/xray.png"
    key_a = add_clinic(catalogue, "clinic-a")
    key_42 = add_clinic(catalogue, "clinic-42")  # the answer jotform_fields() gives
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        download_allow_loopback=True,
        jotform_form_ids=FORM_ID,
        jotform_client_field="clinicId",
        jotform_clinic_from_answer=True,
    ) as base:
        # A clinic's own form: its key in the URL; the operator's allow-list is not needed.
        own = httpx.post(
            f"{base}/webhook?key={key_a}", files=jotform_fields(image_url, "1", form_id="555")
        )
        assert own.status_code == 202, own.text
        # The shared form (allow-listed) with the operator token: the answer names the clinic.
        shared = httpx.post(f"{base}/webhook?token={TOKEN}", files=jotform_fields(image_url, "2"))
        assert shared.status_code == 202, shared.text
        refused = httpx.post(
            f"{base}/webhook?token={TOKEN}", files=jotform_fields(image_url, "3", form_id="555")
        )
        assert refused.status_code == 403
        assert poll(own.json()["url"], headers=bearer(key_a))["clinic"] == "clinic-a"
        mapped = poll(shared.json()["url"], headers=bearer(key_42))
        assert mapped["clinic"] == "clinic-42" and mapped["status"] == "done"
        assert httpx.get(shared.json()["url"], headers=bearer(key_a)).status_code == 404


def test_a_clinic_notify_url_gets_its_results_signed(
    catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:

    from raiox_cli.server import auth

    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    with db.connect(catalogue.settings) as conn:
        key = clients.add(conn, "hooked", notify_url=site.base + "/clinic-hook")[1]
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        webhook_secret=SECRET,  # signs notifications; no RAIOX_NOTIFY_URL at all
        download_allow_loopback=True,
    ) as base:
        sent = httpx.post(
            f"{base}/webhook", json={"image_url": site.base + "/xray.png"}, headers=bearer(key)
        ).json()
        poll(sent["url"], headers=bearer(key))
        deadline = time.monotonic() + 15
        while not site.notifications and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(site.notifications) == 1
    headers, body = site.notifications[0]
    assert auth.verify_signature(SECRET, headers, body) == "msg_" + uuid.UUID(sent["id"]).hex
    payload = json.loads(body)
    assert payload["data"]["id"] == sent["id"] and payload["data"]["clinic"] == "hooked"
