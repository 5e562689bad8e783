"""Helpers for tests that run the server over real HTTP: a local web site (test
images, redirects, a notification receiver), the server in a thread, and the shapes
of deliveries (Jotform's multipart form, Standard Webhooks signatures)."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import uvicorn

from raiox_cli import config, db
from raiox_cli.server import auth
from raiox_cli.server.app import ServerConfig, create_app
from tests.helpers.catalogue import Catalogue

TOKEN = "tok-" + uuid.uuid4().hex
SECRET = "whsec_" + base64.b64encode(uuid.uuid4().bytes * 2).decode()
FORM_ID = "241234567890123"


# --- a local web site: test images, redirects, and a notification receiver ----------


@dataclass
class Site:
    base: str
    routes: dict[str, tuple[int, bytes, dict[str, str]]]
    hits: list[str] = field(default_factory=list)
    notifications: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delays: dict[str, float] = field(default_factory=dict)  # path -> delay of its first hit
    failures: dict[str, int] = field(default_factory=dict)  # path -> 503s before success


def site_handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            site.hits.append(path)
            if site.delays.pop(path, 0):
                time.sleep(4.0)
            if site.failures.get(path, 0) > 0:
                site.failures[path] -= 1
                return self._send(503, b"busy", {})
            status, body, headers = site.routes.get(path, (404, b"no", {}))
            self._send(status, body, headers)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            site.notifications.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self._send(204, b"", {})

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            with contextlib.suppress(OSError):  # a killed client is not our problem
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    return Handler


# --- the server in a thread -------------------------------------------------------


@contextlib.contextmanager
def running(cat: Catalogue, embedder: Any, **changes: Any) -> Iterator[str]:
    server_options = ("insecure_no_auth", "shutdown_grace_s", "batch")
    options = {k: changes.pop(k) for k in server_options if k in changes}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # public_url: the links in notifications point at this very server.
    settings = cat.settings.replace(**{"job_retry_base_s": 0.2, "public_url": base, **changes})
    app = create_app(ServerConfig(settings, embedder, cat.store, poll_s=0.2, **options))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def poll(url: str, *, timeout: float = 30, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(url, **kw).json()
        if answer["status"] in ("done", "failed") or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def jotform_fields(image_url: str, submission_id: str, form_id: str = FORM_ID) -> list:
    """A Jotform webhook POST as Jotform sends it: multipart fields, answers in the
    rawRequest JSON string, the upload listed in temp_upload, its URL under the bare key."""
    raw = {
        "slug": f"submit/{form_id}/",
        "jsExecutionTracker": "build-date-1700000000000=>init-started:1700000000100",
        "submitSource": "form",
        "q3_clinicId": "clinic-42",
        "q4_patientName": {"first": "Ana", "last": "Souza"},
        "temp_upload": {"q5_xrayImage": ["xray.png#d41d8cd9"]},
        "file_server": "jufs-euwest-01",
        "event_id": "1700000000000_241234567890123_abcdefg",
        "timeToSubmit": "41",
        "validatedNewRequiredFieldIDs": '{"new":1}',
        "path": f"/submit/{form_id}/",
        "xrayImage": [image_url],
    }
    fields = {
        "action": "",
        "webhookURL": "https://raiox.example/webhook?token=***",
        "username": "clinicuser",
        "formID": form_id,
        "type": "WEB",
        "customParams": "",
        "product": "false",
        "formTitle": "Implant X-ray",
        "customTitle": "",
        "submissionID": submission_id,
        "event": "",
        "documentID": "",
        "teamID": "",
        "subject": "",
        "isSilent": "false",
        "customBody": "",
        "rawRequest": json.dumps(raw),
        "fromTable": "",
        "appID": "",
        "pretty": f"Clinic ID:clinic-42, Patient Name:Ana Souza, X-ray:{image_url}",
        "unread": "",
        "parent": "",
        "ip": "203.0.113.9",
    }
    return [(name, (None, value)) for name, value in fields.items()]


def signed(body: dict[str, Any], msg_id: str | None = None, timestamp: int | None = None) -> dict:
    raw = json.dumps(body).encode()
    headers = auth.signature_headers(SECRET, msg_id or "msg_" + uuid.uuid4().hex, raw, timestamp)
    return {"content": raw, "headers": {**headers, "content-type": "application/json"}}


def count_analyses(settings: config.Settings) -> int:
    with db.connect(settings) as conn:
        row = conn.execute("SELECT count(*) FROM analyses").fetchone()
        return int(row[0]) if row else 0
