"""Parsing webhook deliveries: Jotform's rawRequest and the JSON API."""

from __future__ import annotations

import json

import pytest

from raiox_cli.server import jotform

URL = "https://www.jotform.com/uploads/clinic/241234567890123/5712345678901234567/pano.jpg"


def form(raw: dict, **fields: str) -> dict[str, str]:
    return {
        "formID": "241234567890123",
        "submissionID": "5712345678901234567",
        "formTitle": "Implant X-ray",
        "pretty": "Clinic ID:WRONG-IF-PARSED, X-ray:https://evil.example/x.jpg",
        "ip": "203.0.113.9",
        "rawRequest": json.dumps(raw),
        **fields,
    }


RAW = {
    "q3_clinicId": "clinic-42",
    "q4_name": {"first": "Ana", "last": "Souza"},
    "temp_upload": {"q5_xrayImage": ["pano.jpg#x1"]},
    "xrayImage": [URL, URL.replace("pano", "bitewing")],
}


def parse(data: dict[str, str], **options: object) -> jotform.Submission:
    settings = {"allowed_form_ids": frozenset(), "client_field": "clinicId", "upload_field": None}
    return jotform.parse_jotform(data, **{**settings, **options})  # type: ignore[arg-type]


def test_upload_found_through_temp_upload_and_pretty_ignored() -> None:
    sub = parse(form(RAW))
    assert sub.image_url == URL
    assert sub.client_id == "clinic-42"
    assert sub.idempotency_key == "jotform:241234567890123:5712345678901234567"
    assert sub.metadata["jotform"]["upload_field"] == "xrayImage"
    assert sub.metadata["jotform"]["other_files"] == [URL.replace("pano", "bitewing")]


def test_configured_fields() -> None:
    raw = {**RAW, "secondUpload": [URL.replace("pano", "other")], "q9_clinic": "c-9"}
    sub = parse(form(raw), upload_field="secondUpload", client_field="clinic")
    assert sub.image_url.endswith("/other.jpg") and sub.client_id == "c-9"
    assert parse(form(RAW), client_field="name").client_id == '{"first": "Ana", "last": "Souza"}'
    assert parse(form(RAW), client_field="absent").client_id is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (form(RAW, submissionID=""), "submissionID"),
        (form(RAW, rawRequest="{not json"), "not valid JSON"),
        (form({"q3_clinicId": "x"}), "temp_upload"),
        (form({**RAW, "xrayImage": []}), "no file URL"),
    ],
)
def test_malformed_deliveries(data: dict[str, str], message: str) -> None:
    with pytest.raises(jotform.BadSubmission, match=message):
        parse(data)


def test_form_allow_list() -> None:
    with pytest.raises(jotform.FormNotAllowed):
        parse(form(RAW), allowed_form_ids=frozenset({"111"}))
    assert parse(form(RAW), allowed_form_ids=frozenset({"241234567890123"})).image_url == URL


def test_json_api() -> None:
    body = json.dumps({"image_url": " https://x.example/a.png ", "client_id": 7, "metadata": {}})
    sub = jotform.parse_json(body.encode(), "msg_1")
    assert (sub.image_url, sub.client_id, sub.idempotency_key) == (
        "https://x.example/a.png",
        "7",
        "webhook-id:msg_1",
    )
    assert jotform.parse_json(b'{"image_url": "https://x/a.png"}', None).idempotency_key is None
    for bad in (b"[]", b"{", b'{"image_url": 3}', b'{"image_url": "u", "metadata": [1]}'):
        with pytest.raises(jotform.BadSubmission):
            jotform.parse_json(bad, None)


def test_submitters_email_answer_is_kept_when_it_is_one_address() -> None:
    raw = {**RAW, "q7_email": " dentista@clinica.com.br "}
    assert parse(form(raw), email_field="email").reply_email == "dentista@clinica.com.br"
    for answer in ("not an address", "a@b.com, c@d.com", {"first": "x"}, ""):
        assert parse(form({**RAW, "q7_email": answer}), email_field="email").reply_email is None
    assert parse(form(raw)).reply_email is None  # no field configured
