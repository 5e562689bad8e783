"""E-mail notifications through a real SMTP server on loopback (aiosmtpd in this
process): STARTTLS with a certificate of its own, a login, refusals."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from test_server import (  # noqa: F401 (catalogue and site are fixtures)
    FORM_ID,
    SECRET,
    TOKEN,
    Catalogue,
    Site,
    catalogue,
    jotform_fields,
    poll,
    running,
    site,
)

from raiox_cli import db
from raiox_cli.db import queries
from raiox_cli.errors import UsageError
from raiox_cli.server import notify

SMTP_USER, SMTP_PASSWORD = "raiox", "s3cret pass/word"
SENDER = "raiox <raiox@clinic.example>"


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it via RAIOX_SMTP_CAFILE)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp.pem", folder / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Mailbox:
    url: str
    cafile: Path
    messages: list[EmailMessage] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # address -> 451s before accepting
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 30) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_RCPT(self, server, session, envelope, address, options) -> str:
        if address.startswith("nobody@"):
            self.box.refused.append(address)
            return "550 5.1.1 no such mailbox"
        with self.box.lock:
            left = self.box.refusals.get(address, 0)
            if left:
                self.box.refusals[address] = left - 1
                self.box.refused.append(address)
                return "451 4.2.1 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        assert session.ssl is not None, "a message arrived without STARTTLS"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.box.messages.append(message)  # type: ignore[arg-type]
        return "250 2.0.0 queued"


def _login(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok)


@pytest.fixture
def mailbox(tmp_path: Path) -> Iterator[Mailbox]:
    import ssl

    cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = SMTP_PASSWORD.replace(" ", "%20").replace("/", "%2F")
    url = f"smtp://{SMTP_USER}:{password}@127.0.0.1:{port}"
    box = Mailbox(url, cert)
    controller = Controller(
        _Handler(box),
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=_login,
        auth_required=True,
    )
    controller.start()
    yield box
    controller.stop()


def links_in(text: str) -> list[str]:
    return re.findall(r"https?://\S+/r/[A-Za-z0-9_-]{50}", text)


def _text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content()


def _store_pending(cat: Catalogue, *, lang: str, reply_email: str) -> str:
    """An analysis as the upload page records it: image stored, language chosen."""
    from raiox_cli import images

    loaded = images.load_image(cat.query_png)
    key = cat.store.put(loaded.sha256, cat.query_png, content_type="image/png")
    with db.connect(cat.settings) as conn:
        analysis_id, _ = queries.create_analysis(
            conn,
            source="upload",
            image_sha256=loaded.sha256,
            storage_key=key,
            lang=lang,
            reply_email=reply_email,
        )
        row = queries.get_analysis(conn, analysis_id)
        conn.commit()
    return str(row["public_id"])


def _notifications(base: str, analysis_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/analyses/{analysis_id}", headers={"x-raiox-token": TOKEN})
    return answer.json().get("notifications", {})


def _wait_email_state(base: str, analysis_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        state = _notifications(base, analysis_id).get("email", {})
        if state.get("status") == status or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_email_arrives_once_in_the_submitters_language(
    catalogue: Catalogue,  # noqa: F811
    tiny_embedder: Any,
    site: Site,  # noqa: F811
    mailbox: Mailbox,
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    mailbox.refusals["busy@clinic.example"] = 2
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        download_allow_loopback=True,
        jotform_form_ids=FORM_ID,
        jotform_client_field="clinicId",
        smtp_url=mailbox.url,
        smtp_cafile=mailbox.cafile,
        smtp_from=SENDER,
        notify_url=site.base + "/notify",
        notify_secret=SECRET,
    ) as base:
        # A Jotform delivery whose e-mail answer is the dentist's (default language pt-BR).
        fields = jotform_fields(site.base + "/xray.png", "5712345678900000001")
        raw_at = next(i for i, (name, _) in enumerate(fields) if name == "rawRequest")
        raw = json.loads(fields[raw_at][1][1])
        raw["q6_email"] = "dentista@clinic.example"
        fields[raw_at] = ("rawRequest", (None, json.dumps(raw)))
        jot = httpx.post(f"{base}/webhook?token={TOKEN}", files=fields).json()
        english = _store_pending(catalogue, lang="en", reply_email="busy@clinic.example")
        refused = _store_pending(catalogue, lang="en", reply_email="nobody@clinic.example")

        for analysis_id in (jot["id"], english, refused):
            result = poll(f"{base}/analyses/{analysis_id}", headers={"x-raiox-token": TOKEN})
            assert result["status"] == "done", result
        # Retried after two 451s, then sent: recorded on the analysis.
        busy = _wait_email_state(base, english, "sent")
        assert busy == {"status": "sent", "attempts": 3, "error": "e-mail refused: 451"}, busy
        # A permanent refusal is not retried; the reason stays on the analysis.
        final = _wait_email_state(base, refused, "failed")
        assert final == {"status": "failed", "attempts": 1, "error": "e-mail refused: 550"}
        messages = mailbox.wait_for(2)
        time.sleep(1.0)  # a duplicate would arrive within the worker's next polls
        assert _notifications(base, jot["id"])["email"]["status"] == "sent"
        # The link in the message opens the result page, in the message's language.
        by_to = {m["To"]: m for m in messages}
        jot_link = links_in(_text(by_to["dentista@clinic.example"]))[0]
        assert jot_link.startswith(base + "/r/")
        page = httpx.get(jot_link, headers={"accept-language": "pt-BR"})
        assert page.status_code == 200 and "Identificação do implante" in page.text
        en_link = links_in(_text(by_to["busy@clinic.example"]))[0]
        english_page = httpx.get(en_link, headers={"accept-language": "en"})
        assert english_page.status_code == 200 and "Implant identification" in english_page.text
        # The webhook channel ran beside it, and its payload carries the same kind of link.
        deadline = time.monotonic() + 15
        while len(site.notifications) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        hooked = {
            json.loads(body)["data"]["id"]: json.loads(body) for _, body in site.notifications
        }
        assert set(hooked) == {jot["id"], english, refused}
        assert all(p["data"]["result_url"].startswith(base + "/r/") for p in hooked.values())

    messages = list(mailbox.messages)
    assert len(messages) == 2, [m["To"] for m in messages]
    by_to = {m["To"]: m for m in messages}
    assert set(by_to) == {"dentista@clinic.example", "busy@clinic.example"}
    assert mailbox.refused.count("busy@clinic.example") == 2
    assert mailbox.refused.count("nobody@clinic.example") == 1

    pt = by_to["dentista@clinic.example"]
    assert pt["Subject"] == "raiox: o resultado da sua radiografia está pronto"
    assert pt["Content-Language"] == "pt-BR" and pt["From"] == SENDER
    body = _text(pt)
    assert "Implante mais parecido:" in body and "Confiança:" in body
    assert links_in(body) == [jot_link]  # the same link the page opened above
    assert "Ana" not in pt["Subject"] and "Souza" not in body  # the patient's name: nowhere
    assert [p.get_content_type() for p in pt.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]  # no X-ray attached
    assert list(pt.iter_attachments()) == []

    en = by_to["busy@clinic.example"]
    assert en["Subject"] == "raiox: your X-ray result is ready"
    assert en["Content-Language"] == "en"
    assert "Most similar implant:" in _text(en) and "Confidence:" in _text(en)
    html = en.get_body(preferencelist=("html",)).get_content()
    assert "Most similar implant:" in html


def test_smtp_url_forms() -> None:
    starttls = notify.SmtpServer.from_url("smtp://u%40x:p%2Fw@mail.example")
    assert (starttls.host, starttls.port, starttls.tls) == ("mail.example", 587, "starttls")
    assert (starttls.username, starttls.password) == ("u@x", "p/w")
    implicit = notify.SmtpServer.from_url("smtps://u:p@mail.example")
    assert (implicit.port, implicit.tls) == (465, "ssl")
    relay = notify.SmtpServer.from_url("smtp://relay.internal?tls=none")
    assert (relay.port, relay.tls, relay.username) == (25, "none", None)
    for bad in ("http://mail.example", "smtp://u:p@relay?tls=none", "smtp://x?tls=maybe"):
        with pytest.raises(UsageError):
            notify.SmtpServer.from_url(bad)
