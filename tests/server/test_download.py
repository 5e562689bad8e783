"""SSRF-safe downloads against a real HTTP server on loopback."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raiox_cli.server import download
from raiox_cli.server.download import DownloadPolicy

PAYLOAD = b"\x89PNG\r\n\x1a\n" + b"x" * 5000


class _Handler(BaseHTTPRequestHandler):
    hits: list[str]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        path = self.path.split("?")[0]
        if path == "/img":
            self._send(200, PAYLOAD, {"Content-Type": "image/png"})
        elif path == "/host":
            self._send(200, self.headers.get("Host", "").encode())
        elif path.startswith("/redirect-to/"):
            self._send(302, b"", {"Location": path[len("/redirect-to/") :]})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif path == "/unsized":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"y" * 1000)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/busy":
            self._send(503, b"later")
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def site() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


LOOPBACK = DownloadPolicy(max_bytes=20_000, allow_loopback=True, deadline_s=2.0)
STRICT = DownloadPolicy(max_bytes=20_000)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b:1::c0a8:101", "private"),  # local-use NAT64 of 192.168.1.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ],
)
def test_non_public_addresses_are_refused(address: str, kind: str) -> None:
    reason = download.address_refusal(ipaddress.ip_address(address))
    assert reason is not None and kind in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_public_addresses_pass(address: str) -> None:
    assert download.address_refusal(ipaddress.ip_address(address)) is None


def test_loopback_switch_allows_loopback_only() -> None:
    allowed = [ipaddress.ip_address(a) for a in ("127.0.0.1", "127.1.2.3", "::1")]
    assert all(download.address_refusal(a, allow_loopback=True) is None for a in allowed)
    for other in ("10.0.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1"):
        assert download.address_refusal(ipaddress.ip_address(other), allow_loopback=True)


def test_fetches_through_the_checked_address_keeping_the_host(
    site: tuple[str, list[str]],
) -> None:
    base, _ = site
    port = base.rsplit(":", 1)[1]
    assert download.download(base + "/img", LOOPBACK).data == PAYLOAD
    # "localhost" resolves to loopback; the request goes to the address but says Host: localhost
    fetched = download.download(f"http://localhost:{port}/host", LOOPBACK)
    assert fetched.data == f"localhost:{port}".encode()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img",
        "http://localhost:{port}/img",
        "http://[::ffff:127.0.0.1]:{port}/img",
        "http://10.0.0.1:{port}/img",
        "http://169.254.169.254/latest/meta-data/",
        "http://0x7f000001:{port}/img",  # 127.0.0.1 spelled as one hex number
    ],
)
def test_refused_before_any_request_without_loopback(site: tuple[str, list[str]], url: str) -> None:
    base, hits = site
    port = base.rsplit(":", 1)[1]
    with pytest.raises(download.DownloadError) as caught:
        download.download(url.format(port=port), STRICT)
    assert isinstance(caught.value, download.UnsafeURL) or not caught.value.transient
    assert hits == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/x.png", "scheme"),
        ("gopher://127.0.0.1:70/", "scheme"),
        ("http://user:pw@example.com/x.png", "credentials"),
        ("http:///nohost", "without a host"),
        ("http://example.com:99999/", "refused URL"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(download.UnsafeURL, match=message):
        download.download(url, STRICT)


def test_redirects_are_checked_again(site: tuple[str, list[str]]) -> None:
    base, hits = site
    assert download.download(base + "/redirect-to/" + base + "/img", LOOPBACK).data == PAYLOAD
    for private in ("http://10.0.0.7/x.png", "http://169.254.169.254/", "http://[fd00::1]/"):
        with pytest.raises(download.UnsafeURL, match="SSRF"):
            download.download(base + "/redirect-to/" + private, LOOPBACK)
    with pytest.raises(download.DownloadFailed, match="redirects"):
        download.download(base + "/loop", LOOPBACK)
    assert not any("10.0.0.7" in h for h in hits if not h.startswith("/redirect-to/"))


def test_size_and_time_caps(site: tuple[str, list[str]]) -> None:
    base, _ = site
    small = DownloadPolicy(max_bytes=1000, allow_loopback=True)
    with pytest.raises(download.DownloadTooLarge, match="1000-byte cap"):
        download.download(base + "/img", small)  # refused on Content-Length
    with pytest.raises(download.DownloadTooLarge):
        download.download(base + "/unsized", small)  # refused while streaming
    slow = DownloadPolicy(max_bytes=1000, allow_loopback=True, deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(download.DownloadFailed, match="longer than") as caught:
        download.download(base + "/drip", slow)
    # the sender never stops sending: permanent, not retried (it would hold a worker again)
    assert not caught.value.transient and time.monotonic() - started < 2.5


def test_http_errors_say_whether_to_retry(site: tuple[str, list[str]]) -> None:
    base, _ = site
    with pytest.raises(download.DownloadFailed, match="HTTP 404") as missing:
        download.download(base + "/nothing", LOOPBACK)
    assert not missing.value.transient
    with pytest.raises(download.DownloadFailed, match="HTTP 503") as busy:
        download.download(base + "/busy", LOOPBACK)
    assert busy.value.transient


def test_host_allow_list(site: tuple[str, list[str]]) -> None:
    base, hits = site
    port = base.rsplit(":", 1)[1]
    only_jotform = DownloadPolicy(
        max_bytes=20_000, allow_loopback=True, allow_hosts=("www.jotform.com", ".jotfor.ms")
    )
    with pytest.raises(download.UnsafeURL, match="RAIOX_DOWNLOAD_ALLOW_HOSTS"):
        download.download(f"http://localhost:{port}/img", only_jotform)
    assert hits == []
    local = DownloadPolicy(max_bytes=20_000, allow_loopback=True, allow_hosts=("localhost",))
    assert download.download(f"http://localhost:{port}/img", local).data == PAYLOAD
    with pytest.raises(download.UnsafeURL, match="ALLOW_HOSTS"):  # redirects too
        download.download(f"http://localhost:{port}/redirect-to/{base}/img", local)
