"""The schema and the server agree on the inputs the contract tester found them
disagreeing on (issue 23 section 4): each value is checked against /openapi.json
(jsonschema) and sent to the real server, and both must refuse it, or both accept."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest

from tests.helpers.catalogue import Catalogue
from tests.helpers.server import FORM_ID, TOKEN, jotform_fields, running

pytestmark = pytest.mark.slow

AUTH = {"authorization": f"Bearer {TOKEN}"}


def _valid(schema: dict[str, Any], value: Any, document: dict[str, Any] | None = None) -> bool:
    # With the document's components beside it, its $refs (#/components/...) resolve.
    if document is not None:
        schema = {**schema, "components": document["components"]}
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def test_the_schema_states_what_the_server_enforces(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN, jotform_form_ids=FORM_ID) as base:
        doc = httpx.get(f"{base}/openapi.json").json()
        done = httpx.post(
            f"{base}/v1/upload", files={"file": ("q.png", catalogue.query_png)}, headers=AUTH
        )
        assert done.status_code == 200, done.text
        analysis = done.json()["id"]

        # GET /analyses?since=: ISO 8601 only, as declared; Unix seconds are refused.
        since = next(
            p["schema"]
            for p in doc["paths"]["/v1/analyses"]["get"]["parameters"]
            if p["name"] == "since"
        )
        for value, ok in [
            ("0", False),
            ("0.5", False),
            ("2026-13-45", False),
            ("2026-02-30", False),  # a day past its month's end (the contract tester's find)
            ("2026-04-31", False),
            ("2023-02-29", False),
            ("2024-02-29", True),  # leap years: by 4, not by 100, by 400
            ("1900-02-29", False),
            ("2000-02-29", True),
            ("0000-01-01", False),  # no year 0 in ISO 8601's common form nor in Python
            ("2026-01-01\n", False),  # Python's `$` would let the newline through
            ("2026-01-01", True),
            ("2026-01-01T08:00:00Z", True),
            ("2026-01-01T08:00:00.5-03:00", True),
        ]:
            answer = httpx.get(f"{base}/v1/analyses", params={"since": value}, headers=AUTH)
            assert (answer.status_code == 200) == ok, (value, answer.text)
            assert _valid(since, value) == ok, value
            if not ok:
                assert answer.status_code == 422 and "ISO 8601" in answer.json()["error"]["message"]

        # OPTIONS lists every method the path takes (RFC 9110), DELETE included.
        options = httpx.options(f"{base}/v1/analyses/{analysis}", headers=AUTH)
        assert options.status_code == 405
        assert {m.strip() for m in options.headers["allow"].split(",")} >= {"GET", "DELETE"}

        # Feedback: an implant or "not in the catalogue", exactly one, in the schema too.
        feedback = doc["paths"]["/v1/analyses/{analysis_id}/feedback"]["post"]["requestBody"]
        feedback = feedback["content"]["application/json"]["schema"]
        for body, ok in [
            ({"implant_key": "a/b/c", "not_in_catalogue": True}, False),
            ({}, False),
            ({"not_in_catalogue": False}, False),
            ({"not_in_catalogue": True}, True),
            ({"not_in_catalogue": True, "note": "a\x00b"}, False),
            ({"not_in_catalogue": True, "client_id": "a\x00b"}, False),
        ]:
            assert _valid(feedback, body) == ok, body
            answer = httpx.post(f"{base}/v1/analyses/{analysis}/feedback", json=body, headers=AUTH)
            assert (answer.status_code < 400) == ok, (body, answer.text)

        webhook = doc["paths"]["/v1/webhook"]["post"]
        headers = {p["name"]: p["schema"] for p in webhook["parameters"] if p["in"] == "header"}
        for name in ("webhook-timestamp", "webhook-signature", "webhook-id"):
            too_long = "1" * (headers[name]["maxLength"] + 1)
            assert not _valid(headers[name], too_long)
            answer = httpx.post(
                f"{base}/v1/webhook",
                json={"image_url": "https://example.com/x.png"},
                headers={**AUTH, name: too_long},
            )
            assert answer.status_code == 400, (name, answer.text)

        delivery = webhook["requestBody"]["content"]["application/json"]["schema"]
        for body, ok in [
            ({"image_url": "https://example.com/x.png", "metadata": None}, False),
            ({"image_url": "https://example.com/x.png", "metadata": False}, False),
            ({"image_url": "https://example.com/x.png", "metadata": 0}, False),
            ({"image_url": "https://example.com/x.png", "client_id": 0}, True),
            ({"image_url": "https://example.com/x.png", "client_id": True}, False),
            ({"image_url": "https://example.com/x.png", "client_id": "a\x00b"}, False),
            ({"image_url": "  "}, False),
            ({"image_url": "https://example.com/x\x00.png"}, False),
            # metadata: any JSON, no NUL in its keys or strings, however deep
            ({"image_url": "https://example.com/x.png", "metadata": {"a": [{"b": "c"}]}}, True),
            ({"image_url": "https://example.com/x.png", "metadata": {"a\x00": 1}}, False),
            ({"image_url": "https://example.com/x.png", "metadata": {"a": [{"b": "\x00"}]}}, False),
            ({"image_url": "https://example.com/x.png", "metadata": {"k" * 201: 1}}, False),
        ]:
            assert _valid(delivery, body, doc) == ok, body
            answer = httpx.post(f"{base}/v1/webhook", json=body, headers=AUTH)
            assert (answer.status_code == 202) == ok, (body, answer.text)

        form = webhook["requestBody"]["content"]["multipart/form-data"]["schema"]
        for field in ("formID", "submissionID"):
            for bad in ("", "   ", "12\x0034"):
                fields = jotform_fields("https://example.com/x.png", "5712345678900000001")
                fields = [(n, (None, bad)) if n == field else (n, v) for n, v in fields]
                values = {n: v[1] for n, v in fields}
                assert not _valid(form, values), (field, bad)
                answer = httpx.post(f"{base}/v1/webhook?token={TOKEN}", files=fields)
                assert answer.status_code == 400, (field, bad, answer.text)
        fields = jotform_fields("https://example.com/x.png", "5712345678900000002")
        fields = [(n, (None, "Raio\x00X")) if n == "formTitle" else (n, v) for n, v in fields]
        assert not _valid(form, {n: v[1] for n, v in fields})
        answer = httpx.post(f"{base}/v1/webhook?token={TOKEN}", files=fields)
        assert answer.status_code == 400, answer.text
