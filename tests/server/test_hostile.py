"""What a hostile client can send never becomes a 500 or a traceback: through the real
HTTP server (uvicorn on loopback, the embedded PostgreSQL, moto's S3), named cases
first, then Hypothesis throwing arbitrary JSON and multipart at every endpoint that
takes a body (/webhook, /upload, /analyses/{id}/feedback)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from raiox_cli.cli import app as cli_app
from raiox_cli.server import inputs
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, count_analyses, jotform_fields, poll, running

AUTH = {"authorization": f"Bearer {TOKEN}"}
URL = "https://www.jotform.com/uploads/x/1/2/pano.png"


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def raw_json(**fields: str) -> bytes:
    """A JSON object whose values are raw JSON text (to send lone surrogate escapes)."""
    return ("{" + ",".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


BAD_JSON_BODIES = {
    "NUL in client_id": raw_json(image_url=json.dumps(URL), client_id='"clinic\\u0000"'),
    "NUL in image_url": raw_json(image_url='"https://a.example/x\\u0000.png"'),
    "NUL in a metadata string": raw_json(
        image_url=json.dumps(URL), metadata='{"patient": {"note": "a\\u0000b"}}'
    ),
    "NUL in a metadata key": raw_json(image_url=json.dumps(URL), metadata='{"a\\u0000": 1}'),
    "lone surrogate in client_id": raw_json(image_url=json.dumps(URL), client_id='"\\ud800"'),
    "lone surrogate in metadata": raw_json(image_url=json.dumps(URL), metadata='{"x": "\\udfff"}'),
    "NaN in metadata": raw_json(image_url=json.dumps(URL), metadata='{"x": NaN}'),
    "10,000 levels deep": deep(10_000).encode(),
    "10,000 levels deep in metadata": raw_json(
        image_url=json.dumps(URL), metadata='{"x": ' + deep(10_000) + "}"
    ),
    "40 levels deep in metadata": raw_json(
        image_url=json.dumps(URL), metadata='{"x": ' + deep(40) + "}"
    ),
    "1 MB client_id": json.dumps({"image_url": URL, "client_id": "c" * 1_000_000}).encode(),
    "1 MB image_url": json.dumps({"image_url": "https://a.example/" + "x" * 1_000_000}).encode(),
    "invalid UTF-8": b'{"image_url": "\xff\xfe"}',
}


def test_every_hostile_body_is_a_400_with_a_reason_and_no_traceback(
    catalogue: Catalogue, tiny_embedder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with running(
        catalogue, tiny_embedder, webhook_token=TOKEN, jotform_client_field="clinicId"
    ) as base:
        for name, body in BAD_JSON_BODIES.items():
            answer = httpx.post(
                f"{base}/webhook",
                content=body,
                headers={**AUTH, "content-type": "application/json"},
                timeout=30,
            )
            assert answer.status_code == 400, (name, answer.status_code, answer.text[:200])
            reason = answer.json()["detail"]
            assert "\n" not in reason and len(reason) < 300, (name, reason)

        # The same inside Jotform's rawRequest, and in its form fields.
        for name, raw in {
            "deep rawRequest": deep(10_000),
            "NUL in the clinic answer": json.dumps(
                {
                    "q3_clinicId": "clinic\x00",
                    "temp_upload": {"q5_xrayImage": ["x.png"]},
                    "xrayImage": [URL],
                }
            ),
            "deep clinic answer": '{"q3_clinicId": '
            + deep(5_000)
            + ', "temp_upload": {"q5_xrayImage": ["x.png"]}, "xrayImage": ["'
            + URL
            + '"]}',
        }.items():
            fields = dict(
                (k, v[1]) for k, v in jotform_fields(URL, "9" + str(len(name)), form_id="241")
            )
            fields["rawRequest"] = raw
            answer = httpx.post(
                f"{base}/webhook",
                params={"token": TOKEN},
                files=[(k, (None, v)) for k, v in fields.items()],
                timeout=30,
            )
            assert answer.status_code == 400, (name, answer.text[:200])
        fields = dict((k, v[1]) for k, v in jotform_fields(URL, "77"))
        fields["submissionID"] = "1\x002"
        answer = httpx.post(
            f"{base}/webhook",
            params={"token": TOKEN},
            files=[(k, (None, v)) for k, v in fields.items()],
        )
        assert answer.status_code == 400 and "NUL" in answer.json()["detail"]

        # Headers that become idempotency keys are bounded too.
        answer = httpx.post(
            f"{base}/webhook",
            json={"image_url": URL},
            headers={**AUTH, "idempotency-key": "k" * 5000},
        )
        assert answer.status_code == 400

        # Numbers past what PostgreSQL's bigint holds are refused by the schema, not the DB.
        for path in ("/implants?skip=18446744073709551616", "/implants/9223372036854775808"):
            assert httpx.get(base + path, headers=AUTH).status_code == 422, path
        for odd in ("99999999999999999999", "%00", "x" * 64):  # ids are UUIDs: all 404
            assert httpx.get(f"{base}/analyses/{odd}", headers=AUTH).status_code == 404
        too_long = httpx.get(f"{base}/analyses/{'x' * 5000}", headers=AUTH)
        assert too_long.status_code == 422  # over the schema's bound

        # Feedback bodies: the same checks before SQL (NUL, surrogates, depth, not UTF-8).
        done = httpx.post(
            f"{base}/upload", files={"file": ("q.png", catalogue.query_png)}, headers=AUTH
        ).json()
        for body in (
            b'{"not_in_catalogue": true, "note": "a\\u0000b"}',
            b'{"implant_key": "\\ud800"}',
            b'{"not_in_catalogue": true, "client_id": "x\\u0000"}',
            deep(10_000).encode(),
            b'{"note": "\xff"}',
        ):
            answer = httpx.post(
                f"{base}/analyses/{done['id']}/feedback",
                content=body,
                headers={**AUTH, "content-type": "application/json"},
            )
            assert 400 <= answer.status_code < 500, (body[:60], answer.text[:200])

        health = httpx.get(f"{base}/healthcheck")
        assert health.status_code == 200 and health.json()["database"] is True
    assert count_analyses(catalogue.settings) == 1  # the upload; nothing else was queued
    logged = capsys.readouterr().err
    assert "Traceback" not in logged
    assert "refused by the database" not in logged  # every case was caught before SQL
    assert "c" * 400 not in logged  # a 1 MB field is never logged whole


def test_log_fields_are_bounded() -> None:
    assert inputs.for_log("x" * 10) == "x" * 10
    bounded = inputs.for_log("x" * 5000)
    assert len(bounded) < 250 and bounded.endswith("(+4800 chars)")


# --- Hypothesis: arbitrary JSON and multipart, no 5xx ------------------------------

HOSTILE_CHARS = st.sampled_from(["\x00", "\ud800", "\udfff", "\u202e", "é", "\\", '"', "\n"])
TEXT = st.text(st.one_of(st.characters(exclude_categories=()), HOSTILE_CHARS), max_size=40)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
# Shaped like a delivery (so the field checks run), or anything at all.
DELIVERY = st.one_of(
    st.fixed_dictionaries(
        {"image_url": st.one_of(TEXT, st.just(URL), JSON)},
        optional={"client_id": JSON, "metadata": JSON},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "implant_key": st.one_of(TEXT, JSON),
            "not_in_catalogue": JSON,
            "note": st.one_of(TEXT, JSON),
            "client_id": st.one_of(TEXT, JSON),
        },
    ),
    JSON,
)
FIELD_VALUE = st.one_of(TEXT, st.binary(max_size=64), JSON.map(json.dumps))
FORM = st.lists(
    st.tuples(
        st.sampled_from(["formID", "submissionID", "rawRequest", "formTitle", "file", "image"])
        | TEXT.filter(lambda s: "\x00" not in s),
        FIELD_VALUE,
        st.booleans(),  # send as a file part
    ),
    max_size=6,
)


def _encode(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


@pytest.mark.slow
def test_arbitrary_json_and_multipart_never_answer_5xx(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        client = httpx.Client(base_url=base, headers=AUTH, timeout=30)
        done = client.post("/upload", files={"file": ("q.png", catalogue.query_png)}).json()
        feedback = f"/analyses/{done['id']}/feedback"  # a done analysis: bodies reach SQL

        @settings(
            max_examples=120,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            body=DELIVERY, form=FORM, endpoint=st.sampled_from(["/webhook", "/upload", "feedback"])
        )
        def check(body: Any, form: list[tuple[str, Any, bool]], endpoint: str) -> None:
            endpoint = feedback if endpoint == "feedback" else endpoint
            text = json.dumps(body, allow_nan=True)  # ensure_ascii: surrogates as \\udXXX
            answer = client.post(
                endpoint, content=text, headers={"content-type": "application/json"}
            )
            assert answer.status_code < 500, (endpoint, text[:300], answer.text[:300])
            files = [
                (name, ("x.bin", _encode(value)) if as_file else (None, _encode(value)))
                for name, value, as_file in form
            ]
            if files:
                answer = client.post(endpoint, files=files)
                assert answer.status_code < 500, (endpoint, files[:3], answer.text[:300])

        check()
        assert client.get("/healthcheck").status_code == 200


# --- a download that never ends, and the CLI's stderr --------------------------------


class _Drip(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(200):  # never done within the deadline
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)


def test_a_download_past_its_deadline_fails_on_the_first_attempt(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    drip = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    drip.daemon_threads = True
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    try:
        with running(
            catalogue,
            tiny_embedder,
            webhook_token=TOKEN,
            download_allow_loopback=True,
            download_deadline_s=1.0,
        ) as base:
            image_url = f"http://127.0.0.1:{drip.server_address[1]}/pano.png"
            answer = httpx.post(f"{base}/webhook", json={"image_url": image_url}, headers=AUTH)
            final = poll(answer.json()["url"], headers=AUTH)
    finally:
        drip.shutdown()
        drip.server_close()
    assert final["status"] == "failed" and "longer than 1 s" in final["error"]
    assert final["attempts"] == 1


def test_cli_refuses_a_12_bit_jpeg_dicom_in_one_line(raiox_env: Any) -> None:
    path = get_testdata_file("JPEG-lossy.dcm")  # 12-bit JPEG: Pillow cannot decode it
    result = CliRunner().invoke(cli_app, ["embed", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert lines == [lines[0]] and lines[0].startswith(f"{path}: cannot decode DICOM")
    assert "Traceback" not in result.stderr and "NotImplementedError" not in result.stderr
