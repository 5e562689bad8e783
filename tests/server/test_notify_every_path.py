"""Every finished analysis notifies, whichever way it came in (analyses.finished):
webhook JSON, Jotform multipart, POST /upload, the upload page and `raiox search
--save` each deliver exactly once to a real HTTP receiver (which refuses every
first attempt, so each delivery is retried) and, where there is an address, once by
e-mail through aiosmtpd; a retried delivery keeps its webhook-id."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from typer.testing import CliRunner

from raiox_cli import db
from raiox_cli.cli import app
from raiox_cli.clinics import keys as clinics
from raiox_cli.clinics import links
from raiox_cli.server import notify
from raiox_cli.server.routes import pages
from tests.helpers.catalogue import Catalogue
from tests.helpers.mail import Mailbox
from tests.helpers.server import FORM_ID, SECRET, TOKEN, Site, jotform_fields, poll, running

SECRET_KEY = "k" * 43


class Receiver:
    """Answers 503 to the first delivery of each message, 204 to the next ones."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []  # (webhook-id, the payload's analysis id)
        self.accepted: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                msg_id = self.headers["webhook-id"]
                first = msg_id not in {m for m, _ in receiver.attempts}
                receiver.attempts.append((msg_id, json.loads(body)["data"]["id"]))
                if not first:
                    receiver.accepted.append(msg_id)
                self.send_response(503 if first else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_every_path_notifies_exactly_once_and_retries_keep_the_id(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, mailbox: Mailbox, monkeypatch: Any
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    receiver = Receiver()
    mailbox.refusals["dentista@clinic.example"] = 1  # the e-mail is retried too
    with db.connect(catalogue.settings) as conn:
        _, key = clinics.add(conn, "Clinica Avisada", email="recepcao@avisada.example")
    channels = {
        "notify_url": receiver.url,
        "notify_secret": SECRET,
        "smtp_url": mailbox.url,
        "smtp_cafile": mailbox.cafile,
        "smtp_from": "raiox <raiox@clinic.example>",
    }
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        download_allow_loopback=True,
        jotform_form_ids=FORM_ID,
        jotform_client_field="clinicId",
        secret_key=SECRET_KEY,
        **channels,
    ) as base:
        ids: dict[str, str] = {}
        hooked = httpx.post(
            f"{base}/webhook",
            json={"image_url": site.base + "/xray.png", "client_id": "json-path"},
            headers={"x-raiox-token": TOKEN},
        )
        ids["webhook JSON"] = hooked.json()["id"]

        fields = jotform_fields(site.base + "/xray.png", "5712345678900000777")
        raw_at = next(i for i, (name, _) in enumerate(fields) if name == "rawRequest")
        raw = json.loads(fields[raw_at][1][1])
        raw["q6_email"] = "dentista@clinic.example"
        fields[raw_at] = ("rawRequest", (None, json.dumps(raw)))
        ids["Jotform"] = httpx.post(f"{base}/webhook?token={TOKEN}", files=fields).json()["id"]

        uploaded = httpx.post(
            f"{base}/upload",
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            headers={"authorization": f"Bearer {key}"},
        )
        assert uploaded.status_code == 200, uploaded.text
        ids["/upload"] = uploaded.json()["id"]

        csrf = "c" * 43
        page = httpx.post(
            base + "/submit",
            data={"csrf": csrf},
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            cookies={pages.CSRF_COOKIE: csrf, pages.KEY_COOKIE: key},
        )
        assert page.status_code == 303, page.text
        token = page.headers["location"].rsplit("/", 1)[1]
        link_key = links.link_key(catalogue.settings.replace(secret_key=SECRET_KEY))
        ids["upload page"] = str(links.verify(link_key, token))

        # The CLI, with the same channels in its environment; the server delivers.
        monkeypatch.setenv("RAIOX_NOTIFY_URL", receiver.url)
        monkeypatch.setenv("RAIOX_NOTIFY_SECRET", SECRET)
        monkeypatch.setenv("RAIOX_SMTP_URL", mailbox.url)
        query = catalogue.settings.home / "query.png"
        query.parent.mkdir(parents=True, exist_ok=True)
        query.write_bytes(catalogue.query_png)
        saved = CliRunner().invoke(app, ["search", str(query), "--save", "--json", "--no-tta"])
        assert saved.exit_code == 0, saved.output
        with db.connect(catalogue.settings) as conn:
            row = conn.execute(
                "SELECT public_id FROM analyses WHERE id = %s",
                (json.loads(saved.stdout)["analysis_id"],),
            ).fetchone()
        assert row is not None
        ids["search --save"] = str(row[0])

        for analysis_id in ids.values():
            result = poll(f"{base}/analyses/{analysis_id}", headers={"x-raiox-token": TOKEN})
            assert result["status"] == "done", result
        deadline = time.monotonic() + 60
        while len(set(receiver.accepted)) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        messages = mailbox.wait_for(3)
        time.sleep(1.5)  # a duplicate would arrive within the worker's next polls

    expected = {path: notify.message_id(str(uuid.UUID(i))) for path, i in ids.items()}
    accepted = Counter(receiver.accepted)
    for path, msg_id in expected.items():
        assert accepted[msg_id] == 1, f"{path}: delivered {accepted[msg_id]} times"
        tries = [payload_id for m, payload_id in receiver.attempts if m == msg_id]
        assert tries == [ids[path]] * 2, f"{path}: {tries}"  # the retry kept its id
    assert len(receiver.accepted) == len(ids)
    # E-mail: the Jotform sender's answer (retried after a 451) and the clinic's
    # address for its upload and its page upload; once each.
    assert Counter(m["To"] for m in messages) == {
        "dentista@clinic.example": 1,
        "recepcao@avisada.example": 2,
    }
