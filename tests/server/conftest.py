"""Fixtures of the server's tests: a local web site (images to download, a
notification receiver), an SMTP server, and a headless browser. The catalogue and the
databases come from tests/conftest.py; the helpers from tests/helpers/."""

from __future__ import annotations

import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.helpers.browser import BROWSER_ARGS, chromium_path
from tests.helpers.mail import SMTP_PASSWORD, SMTP_USER, Mailbox, MailHandler, certificate, login
from tests.helpers.server import Site, site_handler


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True  # a handler still sleeping must not hold up teardown
    info = Site(f"http://127.0.0.1:{server.server_address[1]}", {})
    server.RequestHandlerClass = site_handler(info)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield info
    server.shutdown()
    server.server_close()


@pytest.fixture
def mailbox(tmp_path: Path) -> Iterator[Mailbox]:
    cert, key = certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = SMTP_PASSWORD.replace(" ", "%20").replace("/", "%2F")
    url = f"smtp://{SMTP_USER}:{password}@127.0.0.1:{port}"
    box = Mailbox(url, cert)
    controller = Controller(
        MailHandler(box),
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=login,
        auth_required=True,
    )
    controller.start()
    yield box
    controller.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium for the page tests. Skipped, saying why, only when it is
    not installed (.ci/run installs Debian's chromium with apt-get)."""
    executable = chromium_path()
    why = None
    if executable is None:
        why = "chromium is not installed (apt-get install chromium; .ci/run does it)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            why = "playwright is not installed (pip install -e '.[dev]')"
    if why:
        warnings.warn(f"BROWSER TESTS SKIPPED: {why}", stacklevel=1)
        pytest.skip(f"BROWSER TESTS SKIPPED: {why}")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield chromium
        chromium.close()
