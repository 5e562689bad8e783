"""Fetch a submitted image URL without letting the URL reach inside our network.

Every hop: http/https only, no credentials in the URL, optional host allow-list,
every resolved address must be public (IPv4-mapped, 6to4 and NAT64 forms are
unwrapped first), the connection goes to the address that was checked (the
hostname still drives Host and TLS SNI/certificate checks), redirects are
followed by hand and checked again, and time and bytes are capped.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from raiox_cli.config import Settings
from raiox_cli.errors import RaioxError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
REDIRECTS = (301, 302, 303, 307, 308)
TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


class DownloadError(RaioxError):
    """A submitted URL could not be fetched. `transient` ones are worth retrying;
    `reason` is a short fixed label for metrics."""

    transient = False
    reason = "refused"


class UnsafeURL(DownloadError):
    """Refused before any connection: scheme, host or address not allowed (SSRF)."""


class DownloadTooLarge(DownloadError):
    reason = "too_large"


class DownloadFailed(DownloadError):
    def __init__(self, message: str, *, transient: bool, reason: str = "error") -> None:
        super().__init__(message)
        self.transient = transient
        self.reason = reason


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    deadline_s: float = 30.0
    max_redirects: int = 5
    allow_loopback: bool = False
    allow_hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadPolicy:
        hosts = tuple(
            h.strip().lower() for h in (settings.download_allow_hosts or "").split(",") if h.strip()
        )
        return cls(
            max_bytes=settings.server_max_bytes,
            deadline_s=settings.download_deadline_s,
            connect_timeout_s=min(5.0, settings.download_deadline_s),
            read_timeout_s=min(10.0, settings.download_deadline_s),
            allow_loopback=settings.download_allow_loopback,
            allow_hosts=hosts,
        )


@dataclass(frozen=True)
class Downloaded:
    data: bytes
    content_type: str | None
    final_url: str


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address really leads to, when it wraps one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if any(ip in net for net in NAT64):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_refusal(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why connecting to this address is refused, or None when it is public."""
    inner = _embedded_ipv4(ip)
    shown = str(ip) if inner == ip else f"{ip} (= {inner})"
    if allow_loopback and inner.is_loopback:
        return None
    if isinstance(inner, ipaddress.IPv6Address) and inner.teredo is not None:
        return f"{shown} is a Teredo tunnel address"
    checks = (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
    )
    for attr, label in checks:
        if getattr(inner, attr):
            return f"{shown} is a {label} address"
    if isinstance(inner, ipaddress.IPv4Address) and inner in CGNAT:
        return f"{shown} is a shared (CGNAT) address"
    if inner.is_reserved:
        return f"{shown} is a reserved address"
    if inner.is_private:
        return f"{shown} is a private address"
    if not inner.is_global:
        return f"{shown} is not a public address"
    return None


def _host_allowed(host: str, allow_hosts: Sequence[str]) -> bool:
    """Exact names, or ".example.com" for the domain and its subdomains."""
    for allowed in allow_hosts:
        if allowed.startswith("."):
            if host == allowed[1:] or host.endswith(allowed):
                return True
        elif host == allowed:
            return True
    return False


Resolver = Callable[..., list]


@dataclass(frozen=True)
class _Target:
    url: str  # the URL with the checked address in place of the host
    host_header: str
    hostname: str


def check_url(url: str, policy: DownloadPolicy, resolve: Resolver = socket.getaddrinfo) -> _Target:
    """Validate one hop and pin it to a checked address; raises UnsafeURL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"refused URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURL(f"refused URL scheme {scheme or '(none)'!r}: only http and https")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("refused URL with credentials in it")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UnsafeURL("refused URL without a host")
    if policy.allow_hosts and not _host_allowed(host, policy.allow_hosts):
        raise UnsafeURL(f"refused host {host}: not in RAIOX_DOWNLOAD_ALLOW_HOSTS")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        permanent = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
        raise DownloadFailed(
            f"cannot resolve {host}: {exc.strerror}", transient=not permanent, reason="dns"
        ) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise DownloadFailed(f"{host} has no address", transient=True, reason="dns")
    # Every answer must pass, so a DNS name mixing public and private answers is refused.
    for ip in addresses:
        reason = address_refusal(ip, allow_loopback=policy.allow_loopback)
        if reason:
            raise UnsafeURL(f"refused {host}: {reason} (SSRF protection)")
    ip = addresses[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    pinned = parts._replace(scheme=scheme, netloc=netloc).geturl()
    default_port = port == (443 if scheme == "https" else 80)
    host_header = parts.hostname if default_port else f"{parts.hostname}:{port}"
    if ":" in (parts.hostname or ""):  # an IPv6 literal keeps its brackets in Host
        host_header = f"[{parts.hostname}]" + ("" if default_port else f":{port}")
    return _Target(pinned, str(host_header), host)


def download(
    url: str, policy: DownloadPolicy, resolve: Resolver = socket.getaddrinfo
) -> Downloaded:
    """The bytes at url, within the policy; raises a DownloadError subclass."""
    deadline = time.monotonic() + policy.deadline_s
    timeout = httpx.Timeout(
        connect=policy.connect_timeout_s,
        read=policy.read_timeout_s,
        write=policy.read_timeout_s,
        pool=policy.connect_timeout_s,
    )
    # trust_env=False: a proxy from the environment would connect on our behalf,
    # to addresses we never checked. No keep-alive: every hop opens its own
    # connection to its own checked address, with its own TLS name.
    with httpx.Client(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        for _ in range(policy.max_redirects + 1):
            target = check_url(url, policy, resolve)
            request = client.build_request(
                "GET",
                target.url,
                headers={"Host": target.host_header, "Accept": "image/*"},
                extensions={"sni_hostname": target.hostname},
            )
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException:
                raise DownloadFailed(
                    f"timed out connecting to {target.hostname}", transient=True, reason="timeout"
                ) from None
            except httpx.TransportError as exc:
                raise DownloadFailed(
                    f"cannot fetch from {target.hostname}: {exc}", transient=True, reason="connect"
                ) from None
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                return _read_body(response, url, policy, deadline)
            finally:
                response.close()
    raise DownloadFailed(
        f"more than {policy.max_redirects} redirects", transient=False, reason="redirects"
    )


def _read_body(
    response: httpx.Response, url: str, policy: DownloadPolicy, deadline: float
) -> Downloaded:
    status = response.status_code
    if status != 200:
        raise DownloadFailed(
            f"HTTP {status} from the image URL",
            transient=status in TRANSIENT_STATUS,
            reason=f"http_{status // 100}xx",
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise DownloadTooLarge(f"image of {declared} bytes is over the {policy.max_bytes}-byte cap")
    chunks: list[bytes] = []
    size = 0
    try:
        # Chunks as they arrive, so the deadline is checked while a slow server drips;
        # it can overshoot by at most one read timeout.
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > policy.max_bytes:
                raise DownloadTooLarge(f"image is over the {policy.max_bytes}-byte cap")
            if time.monotonic() > deadline:
                # The sender's doing (it never stops sending): retrying would hold a
                # worker for the deadline again, five times over.
                raise DownloadFailed(
                    f"download took longer than {policy.deadline_s:g} s",
                    transient=False,
                    reason="deadline",
                )
            chunks.append(chunk)
    except httpx.TimeoutException:
        raise DownloadFailed(
            "timed out reading the image", transient=True, reason="timeout"
        ) from None
    except httpx.TransportError as exc:
        raise DownloadFailed(
            f"connection broke while reading the image: {exc}", transient=True, reason="connect"
        ) from None
    content_type = response.headers.get("content-type")
    return Downloaded(b"".join(chunks), content_type, url)
