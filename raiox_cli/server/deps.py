"""What every route shares (the FastAPI full-stack template's deps.py): the server's
configuration, a pooled database connection, the authenticated caller, and the
bounded body and form readers.

    @router.get("/x")
    def x(request: Request, caller: CurrentCaller, conn: ConnDep) -> JSONResponse: ...

Sync routes get `conn` in the thread FastAPI runs them in; async routes that must
read the body first use `with_db` inside `run_in_threadpool`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
import psycopg_pool
from fastapi import Depends, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from raiox_cli import utc
from raiox_cli.clinics import keys
from raiox_cli.config import Settings
from raiox_cli.embedding import Embedder
from raiox_cli.errors import DatabaseUnavailable, RaioxError
from raiox_cli.server import auth, jotform
from raiox_cli.server.results import Links
from raiox_cli.server.worker import BATCH
from raiox_cli.store.objects import Store

SHUTDOWN_GRACE_S = 20.0
DB_TIMEOUT_S = 10.0


@dataclass
class ServerConfig:
    settings: Settings
    embedder: Embedder
    store: Store
    insecure_no_auth: bool = False
    worker_threads: int = 2
    pool_size: int = 8
    poll_s: float = 1.0
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    batch: int = BATCH  # jobs per worker thread and forward pass; 1 = one at a time


class TooLarge(RaioxError):
    pass


def server_config(request: Request) -> ServerConfig:
    return request.app.state.config


def base_url(request: Request) -> str:
    """The server's address as this client reached it, without the /v1 prefix."""
    base = str(request.base_url).rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def links_for(request: Request) -> Links:
    config = server_config(request)
    return Links(config.store, config.settings, base_url(request))


def analysis_url(request: Request, public_id: uuid.UUID | str) -> str:
    """Where the API answers for this analysis: always the versioned path (/v1), the
    one the documentation names, whichever path the request came by."""
    return f"{base_url(request)}/v1/analyses/{public_id}"


# --- the database -------------------------------------------------------------------


def with_db(
    request: Request, fn: Callable[[psycopg.Connection], Any], timeout_s: float = DB_TIMEOUT_S
) -> Any:
    """fn(conn) on a pooled connection (blocking: call it in a thread); a database
    that cannot be reached is DatabaseUnavailable (503)."""
    return with_pool(request.app, fn, timeout_s)


def with_pool(
    app: FastAPI, fn: Callable[[psycopg.Connection], Any], timeout_s: float = DB_TIMEOUT_S
) -> Any:
    """`with_db` outside a request (the shared failed-authentication counters)."""
    pool: psycopg_pool.ConnectionPool = app.state.pool
    try:
        with pool.connection(timeout=timeout_s) as conn:
            return fn(conn)
    except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc


def pooled_connection(request: Request) -> Iterator[psycopg.Connection]:
    """A connection for one sync route, as `with_db` gives it (503 when unreachable)."""
    pool: psycopg_pool.ConnectionPool = request.app.state.pool
    try:
        with pool.connection(timeout=DB_TIMEOUT_S) as conn:
            yield conn
    except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc


# scope="function": committed (or rolled back) before the answer leaves, so a client
# that deletes and then reads never sees the old row.
ConnDep = Annotated[psycopg.Connection, Depends(pooled_connection, scope="function")]


# --- who is asking --------------------------------------------------------------------


def _credential(request: Request) -> str | None:
    """A clinic key or the operator token: `Authorization: Bearer`, `X-Raiox-Key`
    (or `X-Raiox-Token`), or in the URL as ?key= (or ?token=) for Jotform."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    for name in ("x-raiox-key", "x-raiox-token"):
        if request.headers.get(name):
            return request.headers[name].strip()
    return request.query_params.get("key") or request.query_params.get("token")


def source_address(request: Request) -> str:
    # uvicorn's proxy_headers already replaced it with X-Forwarded-For's, from nginx.
    return request.client.host if request.client else "unknown"


def authenticate(
    request: Request, body: bytes, *, signed_delivery: bool
) -> tuple[auth.Caller, str | None]:
    """Who the request acts as, and the verified webhook-id, if any. Blocking (a
    clinic key is looked up in the database): call it in a thread.

    A clinic key (rxk_...) acts as that clinic. Otherwise the operator's rules: the
    token, when set, is needed on every API request; a signature, when a secret is
    set, is needed on JSON webhook deliveries, and stands in for the token
    elsewhere when no token is set. Jotform can send neither headers nor
    signatures: it carries the key or token in the URL (?key=, ?token=). Failures
    count against the source address (auth.FailureLimiter).
    """
    config = server_config(request)
    if config.insecure_no_auth:
        return auth.OPERATOR, None
    limiter: auth.FailureLimiter = request.app.state.limiter
    address = source_address(request)
    limiter.check(address)
    try:
        return _identify(request, body, signed_delivery=signed_delivery)
    except auth.Unauthorized:
        limiter.failed(address)
        raise


def _identify(
    request: Request, body: bytes, *, signed_delivery: bool
) -> tuple[auth.Caller, str | None]:
    settings = server_config(request).settings
    provided = _credential(request)
    if provided and keys.looks_like_key(provided):
        clinic = with_db(request, lambda conn: keys.authenticate(conn, provided))
        if clinic is None:
            raise auth.Unauthorized("unknown, revoked or expired key")
        return auth.Caller(clinic.id, clinic.name), None
    if not (settings.webhook_token or settings.webhook_secret):
        raise auth.Unauthorized("this server accepts clinic keys only")
    if settings.webhook_token and not auth.token_matches(settings.webhook_token, provided):
        raise auth.Unauthorized("missing or wrong token")
    if settings.webhook_secret and (signed_delivery or not settings.webhook_token):
        return auth.OPERATOR, auth.verify_signature(settings.webhook_secret, request.headers, body)
    return auth.OPERATOR, None


async def current_caller(request: Request) -> auth.Caller:
    """The authenticated caller of a request without a signed body (reads, lists,
    feedback). Pass `caller.clinic_id` to the scoped queries."""
    caller, _ = await run_in_threadpool(authenticate, request, b"", signed_delivery=False)
    request.state.caller = caller
    return caller


CurrentCaller = Annotated[auth.Caller, Depends(current_caller)]
# Any text up to 64 characters: what is not one of our UUIDs is simply not found (404).
PublicId = Annotated[str, Path(min_length=1, max_length=64, description="the analysis's id")]


def parse_public_id(value: str) -> uuid.UUID | None:
    """An analysis id from a URL; None (answer 404) for anything not a UUID."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# --- bodies -------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(headers: Headers, body: bytes) -> FormData:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    content_type = headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            return await MultiPartParser(headers, stream(), max_files=4, max_fields=500).parse()
        return await FormParser(headers, stream()).parse()
    except MultiPartException as exc:
        raise jotform.BadSubmission(f"malformed form data: {exc.message}") from None
    except (ValueError, KeyError, UnicodeError) as exc:  # garbage the parsers trip over
        raise jotform.BadSubmission(f"malformed form data: {type(exc).__name__}") from None


async def read_form(request: Request, limit: int) -> FormData:
    return await parse_form(request.headers, await read_body(request, limit))


def is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


def json_ready(data: dict[str, Any]) -> dict[str, Any]:
    # Timestamps in UTC with an explicit offset, whatever the session's time zone.
    return jsonable_encoder(data, custom_encoder={dt.datetime: utc.iso})
