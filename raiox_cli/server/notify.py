"""Tell someone an analysis finished: one Notifier interface, two channels behind it.

- webhook: POST the result to RAIOX_NOTIFY_URL, signed with Standard Webhooks
  headers so the receiver can check it came from us and drop replays;
- email: a short message to the clinic (or the submitter) in their language with
  the top match, the confidence wording and the signed result link; SMTP with
  STARTTLS or TLS and authentication from RAIOX_SMTP_URL. No X-ray attached, no
  patient data in the subject.

The worker queues one delivery per channel (queries/notifications.py) and retries
each with backoff; a channel raises NotifyFailed, saying whether a retry may help.
"""

from __future__ import annotations

import datetime as dt
import json
import smtplib
import ssl
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

from raiox_cli import utc
from raiox_cli.config import Settings
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.server import auth, i18n, results

TIMEOUT_S = 10.0
TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


class NotifyFailed(RaioxError):
    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Finished:
    """What every channel tells about a finished analysis."""

    view: dict[str, Any]  # the GET /analyses/{id} answer, with result_url and confidence
    lang: str  # pt-BR or en: the language e-mails are written in
    link_expires_at: dt.datetime | None = None  # when view["result_url"] stops working
    timezone: str = "UTC"  # the times in e-mails: the clinic's, else RAIOX_TIMEZONE


class Notifier(Protocol):
    channel: str

    def deliver(self, finished: Finished, recipient: str | None) -> None:
        """Deliver once or raise NotifyFailed."""


# --- webhook ---------------------------------------------------------------------


def message_id(public_id: str) -> str:
    """Stable across retries (the receiver dedupes on webhook-id) and unique across
    installations and database resets: the analysis's random public id, never the
    internal counter that restarts at 1 on every new database."""
    return f"msg_{uuid.UUID(str(public_id)).hex}"


def payload(result: dict[str, Any]) -> bytes:
    kind = "analysis.completed" if result["status"] == "done" else "analysis.failed"
    body = {"type": kind, "timestamp": utc.iso(utc.now()), "data": result}
    return json.dumps(body, default=_encode, separators=(",", ":")).encode()


def _encode(value: Any) -> Any:
    return utc.iso(value) if isinstance(value, dt.datetime) else str(value)


def send(url: str, secret: str, public_id: str, body: bytes) -> None:
    headers = auth.signature_headers(secret, message_id(public_id), body)
    headers["content-type"] = "application/json"
    try:
        # The URL is the operator's own setting, not submitted input, so it is not
        # put through the SSRF checks; no proxies from the environment, no redirects.
        with httpx.Client(timeout=TIMEOUT_S, trust_env=False, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise NotifyFailed(
            f"notification not delivered: {type(exc).__name__}", transient=True
        ) from None
    if not 200 <= response.status_code < 300:
        raise NotifyFailed(
            f"notification answered HTTP {response.status_code}",
            transient=response.status_code in TRANSIENT_STATUS or response.status_code >= 500,
        )


@dataclass(frozen=True)
class WebhookNotifier:
    url: str | None  # RAIOX_NOTIFY_URL; a clinic's own URL comes as the recipient
    secret: str
    channel: str = "webhook"

    def deliver(self, finished: Finished, recipient: str | None) -> None:
        url = recipient or self.url
        if not url:
            raise NotifyFailed("no notification URL for this analysis", transient=False)
        send(url, self.secret, finished.view["id"], payload(finished.view))


# --- e-mail ----------------------------------------------------------------------

SMTP_PORTS = {"ssl": 465, "starttls": 587, "none": 25}


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to send: parsed from RAIOX_SMTP_URL.

    smtp://user:password@host:587   STARTTLS (required: no password in clear)
    smtps://user:password@host:465  TLS from the first byte
    smtp://relay.internal:25?tls=none  a trusted relay, no TLS and no login
    """

    host: str
    port: int
    tls: str  # starttls, ssl, none
    username: str | None = None
    password: str | None = None
    cafile: Path | None = None

    @classmethod
    def from_url(cls, url: str, cafile: Path | None = None) -> SmtpServer:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise UsageError(
                "RAIOX_SMTP_URL must look like smtp://user:password@host:587 (STARTTLS) "
                "or smtps://user:password@host:465 (TLS)"
            )
        tls = "ssl" if parts.scheme == "smtps" else "starttls"
        option = parse_qs(parts.query).get("tls", [None])[0]
        if option is not None:
            if option not in SMTP_PORTS:
                raise UsageError("RAIOX_SMTP_URL ?tls= must be starttls, ssl or none")
            tls = option
        username = unquote(parts.username) if parts.username else None
        if tls == "none" and username:
            raise UsageError("RAIOX_SMTP_URL: ?tls=none would send the password in clear")
        return cls(
            host=parts.hostname,
            port=parts.port or SMTP_PORTS[tls],
            tls=tls,
            username=username,
            password=unquote(parts.password) if parts.password else None,
            cafile=cafile,
        )

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)

    def send(self, message: EmailMessage) -> None:
        try:
            if self.tls == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=TIMEOUT_S, context=self._context()
                )
            else:
                client = smtplib.SMTP(self.host, self.port, timeout=TIMEOUT_S)
            with client:
                if self.tls == "starttls":
                    client.starttls(context=self._context())
                if self.username:
                    client.login(self.username, self.password or "")
                client.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise NotifyFailed(
                f"e-mail refused: {', '.join(str(c) for c in codes)}",
                transient=all(400 <= c < 500 for c in codes),
            ) from None
        except smtplib.SMTPResponseException as exc:
            # 4xx: try later (greylisting, mailbox busy); 5xx: final, except a login
            # refused, which an operator can fix without losing the message.
            transient = 400 <= exc.smtp_code < 500 or isinstance(
                exc, smtplib.SMTPAuthenticationError
            )
            raise NotifyFailed(
                f"e-mail refused: SMTP {exc.smtp_code}", transient=transient
            ) from None
        except (smtplib.SMTPException, OSError) as exc:  # connection, TLS, timeout
            raise NotifyFailed(
                f"e-mail not delivered: {type(exc).__name__}", transient=True
            ) from None


def render_email(finished: Finished) -> tuple[str, str, str]:
    """(subject, plain text, HTML) telling that an analysis finished, in its language.
    The subject names no patient and no implant: only "ready" or "could not"."""
    view, t = finished.view, i18n.Translator(finished.lang, finished.timezone)
    done = view["status"] == "done"
    top = None
    if done and view.get("matches"):
        best = view["matches"][0]
        top = {
            "name": best["name"] or best["key"],
            "manufacturer": best["manufacturer"] or "",
            "score": t.number(float(best["score"])),
        }
    created = view.get("created_at")
    context = {
        "t": t,
        "lang": t.lang,
        "status": view["status"],
        "sent_at": t.when(created) if isinstance(created, dt.datetime) else "",
        "top": top,
        "confidence": t(f"email.confidence.{view.get('confidence') or 'none'}"),
        "trust": results.trust_words(
            t, view.get("trust"), {m["key"]: m["name"] or m["key"] for m in view.get("matches", [])}
        ),
        "failed_reason": "" if done else t.failure(view),
        "url": view.get("result_url"),
        "expires": t.when(finished.link_expires_at),
        "analysis_id": view["id"],
        "subject": t("email.subject.done" if done else "email.subject.failed"),
    }
    text = i18n.environment(autoescape=False).get_template("email.txt").render(**context)
    html = i18n.environment().get_template("email.html").render(**context)
    return context["subject"], text, html


class EmailNotifier:
    channel = "email"

    def __init__(self, server: SmtpServer, sender: str) -> None:
        self.server = server
        self.sender = sender

    def message(self, finished: Finished, recipient: str) -> EmailMessage:
        subject, text, html = render_email(finished)
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = recipient
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        # Stable across retries, so a receiving server can drop a duplicate.
        domain = self.sender.rsplit("@", 1)[-1].strip("> ") or "raiox.invalid"
        message["Message-ID"] = f"<raiox.analysis.{finished.view['id']}@{domain}>"
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        message["Content-Language"] = finished.lang  # after: set_content drops Content-*
        return message

    def deliver(self, finished: Finished, recipient: str | None) -> None:
        if not recipient:
            raise NotifyFailed("no e-mail address", transient=False)
        self.server.send(self.message(finished, recipient))


def notifiers(settings: Settings) -> dict[str, Notifier]:
    """The channels the settings turn on, by name."""
    found: dict[str, Notifier] = {}
    secret = settings.notify_secret or settings.webhook_secret
    if secret:  # clinics may have their own URL (clients add --notify-url) without this one
        found["webhook"] = WebhookNotifier(settings.notify_url, secret)
    if settings.smtp_url:
        found["email"] = EmailNotifier(
            SmtpServer.from_url(settings.smtp_url, settings.smtp_cafile), sender_of(settings)
        )
    return found


def sender_of(settings: Settings) -> str:
    if not settings.smtp_from:
        raise UsageError(
            "RAIOX_SMTP_URL is set but RAIOX_SMTP_FROM is not: "
            'set it to "raiox <raiox@your-domain>"'
        )
    return settings.smtp_from
