"""What the API's answers carry, checked on real answers of the real server: every
property is one the OpenAPI document declares (validated with additional properties
forbidden), no answer or notification holds a `file://` server path, a local store's
images are served through signed, expiring links, and every answer with a public id
links the dentist's result page when RAIOX_PUBLIC_URL is set."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image

from raiox_cli import analyses, config, db
from raiox_cli.clinics import links
from raiox_cli.store import objects as storage
from raiox_cli.training import synth
from tests.helpers.catalogue import Catalogue, store_synthetic_catalogue
from tests.helpers.server import SECRET, TOKEN, Site, poll, running

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def local_catalogue(migrated: config.Settings, tiny_embedder: Any, tmp_path: Path) -> Catalogue:
    """The catalogue with its images in the default local store (no RAIOX_S3_*)."""
    settings = config.resolve()
    store = storage.open_store(settings)
    assert isinstance(store, storage.LocalStore)
    info = synth.make_catalogue(tmp_path / "synth", systems=4, views=2, queries=1, size=(96, 120))
    with db.connect(settings) as conn:
        implant_ids = store_synthetic_catalogue(conn, tiny_embedder, info, store)
    return Catalogue(settings, store, info.query_files[0].read_bytes(), implant_ids)


def strict(schema: Any) -> Any:
    """The schema with additional properties forbidden wherever it lists properties."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Contract:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = strict(document)
        self.checked: list[str] = []

    def check(self, method: str, path: str, answer: httpx.Response) -> dict[str, Any]:
        operation = self.document["paths"][path][method]
        response = operation["responses"][str(answer.status_code)]
        schema = response["content"]["application/json"]["schema"]
        body = answer.json()
        root = {"components": self.document["components"], **schema}
        jsonschema.Draft202012Validator(root).validate(body)
        self.checked.append(f"{method.upper()} {path} {answer.status_code}")
        return body

    def analysis(self, data: dict[str, Any]) -> None:
        """A notification's `data`: the Analysis model."""
        root = {
            "components": self.document["components"],
            "$ref": "#/components/schemas/Analysis",
        }
        jsonschema.Draft202012Validator(root).validate(data)


def _wait_for_notifications(site: Site, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while len(site.notifications) < count:
        assert time.monotonic() < deadline, site.notifications
        time.sleep(0.1)
    return [json.loads(body) for _, body in site.notifications]


def test_answers_declare_every_field_and_never_a_server_path(
    local_catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:
    cat = local_catalogue
    site.routes["/xray.png"] = (200, cat.query_png, {"Content-Type": "image/png"})
    texts: list[str] = []  # every answer and notification, searched for file:// below
    with running(
        cat,
        tiny_embedder,
        webhook_token=TOKEN,
        notify_url=site.base + "/notify",
        notify_secret=SECRET,
        download_allow_loopback=True,
    ) as base:
        contract = Contract(httpx.get(f"{base}/openapi.json").json())

        def call(method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
            kw.setdefault("headers", AUTH)
            answer = httpx.request(method, base + path, timeout=60, **kw)
            assert answer.status_code == status, answer.text
            texts.append(answer.text)
            template = next(
                p
                for p in contract.document["paths"]
                if _matches(p, path.split("?")[0])
                and method.lower() in contract.document["paths"][p]
            )
            return contract.check(method.lower(), template, answer)

        uploaded = call("POST", "/v1/upload", 200, files={"file": ("q.png", cat.query_png)})
        body = {"image_url": site.base + "/xray.png", "client_id": "c-1"}
        once = {"idempotency-key": "delivery-" + uuid.uuid4().hex}
        accepted = call("POST", "/v1/webhook", 202, json=body, headers={**AUTH, **once})
        assert accepted["url"] == f"{base}/v1/analyses/{accepted['id']}"
        again = call(
            "POST", "/webhook", 200, json=body, params={"wait": 20}, headers={**AUTH, **once}
        )
        assert again["replayed"] and again["status"] == "done"
        # The unversioned alias answers the versioned address (the one the docs name).
        assert again["url"] == f"{base}/v1/analyses/{accepted['id']}"
        poll(f"{base}/v1/analyses/{accepted['id']}", headers=AUTH)
        _wait_for_notifications(site, 1)
        deadline = time.monotonic() + 10
        while True:
            read = call("GET", f"/v1/analyses/{accepted['id']}", 200)
            if read.get("notifications", {}).get("webhook", {}).get("status") == "sent":
                break
            assert time.monotonic() < deadline, read
            time.sleep(0.2)
        call("GET", "/v1/analyses", 200)
        call("GET", "/v1/analyses?status=done&limit=5", 200)
        implants = call("GET", "/v1/implants", 200)
        call("GET", f"/v1/implants/{implants['items'][0]['id']}", 200)
        key = uploaded["matches"][0]["key"]
        call("POST", f"/v1/analyses/{uploaded['id']}/feedback", 201, json={"implant_key": key})
        call(
            "POST",
            f"/v1/analyses/{uploaded['id']}/feedback",
            201,
            json={"not_in_catalogue": True, "note": "Neodent Helix GM"},
        )
        refused = call(
            "POST", f"/v1/analyses/{uploaded['id']}/feedback", 422, json={"implant_key": "zz/zz"}
        )
        assert "--" not in refused["error"]["message"]  # an API answer names no CLI flag
        call("GET", f"/v1/analyses/{uuid.uuid4()}", 404)
        call("GET", "/v1/healthcheck", 200)

        for payload in [json.loads(body) for _, body in site.notifications]:
            texts.append(json.dumps(payload))
            contract.analysis(payload["data"])
            assert payload["data"]["result_url"].startswith(f"{base}/r/")

        # Every stored image is a signed link of this server, opened without credentials.
        answers = [uploaded, again, read]
        image_links = [a["image"]["url"] for a in answers]
        image_links += [m["image_url"] for a in answers for m in a["matches"]]
        assert image_links and all(u.startswith(f"{base}/v1/images/") for u in image_links)
        for url in image_links:
            got = httpx.get(url)
            assert got.status_code == 200, url
            assert got.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(got.content)).size[0] > 0
        token = image_links[0].rsplit("/", 1)[-1]
        tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BA")
        assert httpx.get(f"{base}/v1/images/{tampered}").status_code == 404
        key = links.image_key(cat.settings)
        expired = links.sign_image(key, "ab" * 32, int(time.time()) - 1)
        assert httpx.get(f"{base}/v1/images/{expired}").status_code == 410
        unknown = links.sign_image(key, "ab" * 32, int(time.time()) + 60)
        assert httpx.get(f"{base}/images/{unknown}").status_code == 404

    assert not [t for t in texts if "file://" in t]
    assert len(contract.checked) >= 12, contract.checked


def _matches(template: str, path: str) -> bool:
    """Whether a concrete path is an instance of an OpenAPI path template."""
    if not path.startswith("/v1/"):
        path = "/v1" + path
    want, got = template.strip("/").split("/"), path.strip("/").split("/")
    return len(want) == len(got) and all(
        w == g or (w.startswith("{") and w.endswith("}")) for w, g in zip(want, got, strict=True)
    )


def test_result_url_only_with_a_public_address(
    local_catalogue: Catalogue, tiny_embedder: Any
) -> None:
    cat = local_catalogue
    with running(cat, tiny_embedder, webhook_token=TOKEN) as base:
        uploaded = httpx.post(
            f"{base}/v1/upload", files={"file": ("q.png", cat.query_png)}, headers=AUTH
        ).json()
        assert uploaded["result_url"].startswith(f"{base}/r/")
        page = httpx.get(uploaded["result_url"])
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        listed = httpx.get(f"{base}/v1/analyses", headers=AUTH).json()["items"][0]
        assert listed["result_url"].startswith(f"{base}/r/")
    with running(cat, tiny_embedder, webhook_token=TOKEN, public_url=None) as base:
        read = httpx.get(f"{base}/v1/analyses/{uploaded['id']}", headers=AUTH).json()
        assert read["result_url"] is None
        # Images are still linked: a request's own address is known.
        assert read["image"]["url"].startswith(f"{base}/v1/images/")


def test_docs_work_offline_and_browsers_get_pages(
    local_catalogue: Catalogue, tiny_embedder: Any
) -> None:
    """/docs and /redoc load nothing from another host; an unknown path answers a
    browser with the not-found page and an API client with JSON; a favicon exists."""
    with running(local_catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        for page in ("/docs", "/redoc"):
            html = httpx.get(base + page)
            assert html.status_code == 200 and "text/html" in html.headers["content-type"]
            assert "http://" not in html.text and "https://" not in html.text, page
            assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
            assert assets, page
            for asset in assets:
                assert asset.startswith("/"), asset  # this server, never a CDN
                assert httpx.get(base + asset).status_code == 200, asset
        icon = httpx.get(base + "/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/png"
        assert httpx.get(base + "/openapi.json").status_code == 200

        browser = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        for lang, words in (("en", "There is nothing at this address"), ("pt-BR", "Não há nada")):
            page = httpx.get(f"{base}/no/such/page", headers={**browser, "accept-language": lang})
            assert page.status_code == 404 and "text/html" in page.headers["content-type"]
            assert words in page.text and 'href="/favicon.ico"' in page.text
        api = httpx.get(f"{base}/no/such/page")
        assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"
        # A route's own 404 stays JSON, even for a browser.
        missing = httpx.get(f"{base}/v1/analyses/{uuid.uuid4()}", headers={**browser, **AUTH})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_job_and_request_logs_name_the_same_public_id(
    local_catalogue: Catalogue, tiny_embedder: Any, capsys: pytest.CaptureFixture
) -> None:
    with running(local_catalogue, tiny_embedder, webhook_token=TOKEN, batch=1) as base:
        sent = httpx.post(
            f"{base}/v1/upload", files={"file": ("q.png", local_catalogue.query_png)}, headers=AUTH
        )
        assert sent.status_code == 200
        pending = _store_pending(local_catalogue)
        poll(f"{base}/v1/analyses/{pending}", headers=AUTH)
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    jobs = [line for line in lines if str(line.get("event", "")).startswith("job ")]
    assert {line["event"] for line in jobs} >= {"job started", "job done"}
    assert {line["analysis_id"] for line in jobs} == {pending}
    requests = [line for line in lines if line.get("event") == "request"]
    assert sent.json()["id"] in {line.get("analysis_id") for line in requests}
    assert pending in {line.get("analysis_id") for line in requests}


def _store_pending(cat: Catalogue) -> str:
    """A pending analysis whose X-ray is in the store, as the upload page leaves it."""
    with db.connect(cat.settings) as conn:
        loaded = analyses.load_upload(cat.settings, cat.query_png)
        analysis_id = analyses.accept_upload(
            conn, cat.store, cat.settings, cat.query_png, loaded, clinic_id=None
        )
        public_id = conn.execute(
            "SELECT public_id FROM analyses WHERE id = %(a)s", {"a": analysis_id}
        ).fetchone()[0]
        conn.commit()
    return str(public_id)
