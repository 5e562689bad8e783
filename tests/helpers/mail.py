"""A real SMTP server on loopback for notification tests (aiosmtpd in this process):
STARTTLS with a self-signed certificate, a login, scripted refusals."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.smtp import AuthResult, LoginPassword

SMTP_USER, SMTP_PASSWORD = "raiox", "s3cret pass/word"
SENDER = "raiox <raiox@clinic.example>"


def certificate(folder: Path) -> tuple[Path, Path]:
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


class MailHandler:
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


def login(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok)
