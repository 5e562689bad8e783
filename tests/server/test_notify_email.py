"""E-mail notifications through a real SMTP server on loopback (aiosmtpd in this
process): STARTTLS with a certificate of its own, a login, refusals."""

from __future__ import annotations

import json
import re
import time
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from raiox_cli import db
from raiox_cli.db import queries
from raiox_cli.errors import UsageError
from raiox_cli.server import notify
from tests.helpers.catalogue import Catalogue
from tests.helpers.mail import SENDER, Mailbox
from tests.helpers.server import FORM_ID, SECRET, TOKEN, Site, jotform_fields, poll, running


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
    catalogue: Catalogue,
    tiny_embedder: Any,
    site: Site,
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
