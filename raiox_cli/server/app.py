"""The HTTP app (FastAPI on uvicorn) and `serve`, which the CLI command calls.

Requests only validate, authenticate and record; the work happens in the
worker threads (server/worker.py) so a slow download or model never holds a
connection from Jotform open, and nothing accepted is lost when the process is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import psycopg
import psycopg_pool
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pgvector.psycopg import register_vector
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.staticfiles import StaticFiles

from raiox_cli import __version__, db, images, utc
from raiox_cli.clinics import feedback, keys, privacy, retention
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import Embedder
from raiox_cli.errors import DatabaseUnavailable, RaioxError, UsageError
from raiox_cli.lifecycle import Terminated
from raiox_cli.search import query as search
from raiox_cli.server import (
    auth,
    inputs,
    jotform,
    logs,
    notify,
    openapi,
    pages,
    results,
    schemas,
)
from raiox_cli.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from raiox_cli.server.metrics import Metrics, route_of
from raiox_cli.server.worker import BATCH, Store, Worker

MAX_WAIT_S = 60
MAX_PAGE = 100
MAX_ID = 2**63 - 1  # PostgreSQL bigint: a larger id cannot exist, so it is a 404 or a 422
MAX_SKIP = 2**31 - 1
SHUTDOWN_GRACE_S = 20.0
FEEDBACK_MAX_BYTES = 16_384  # a confirmation is a few short fields


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


class FeedbackIn(BaseModel):
    """The dentist's answer for an analysis: the implant it really is (any implant
    of the catalogue, by key), or `not_in_catalogue: true`; one of the two."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"implant_key": "straumann/bone level/blx 4.0", "note": "surgical report"},
                {"not_in_catalogue": True, "note": "Neodent Helix GM"},
            ]
        },
    )

    implant_key: str | None = Field(
        None,
        min_length=1,
        max_length=feedback.MAX_KEY,
        description="manufacturer/system/name (or manufacturer/name), any case",
    )
    not_in_catalogue: bool = False
    note: str | None = Field(None, max_length=feedback.MAX_NOTE)
    client_id: str | None = Field(
        None, max_length=feedback.MAX_CLIENT_ID, description="who confirms"
    )

    @model_validator(mode="after")
    def one_answer(self) -> FeedbackIn:
        if (self.implant_key is None) == (not self.not_in_catalogue):
            raise ValueError("give implant_key or not_in_catalogue: true, one of them")
        return self


def check_auth_configured(settings: Settings, insecure_no_auth: bool) -> None:
    if not (settings.webhook_token or settings.webhook_secret or insecure_no_auth):
        raise UsageError(
            "no authentication configured: set RAIOX_WEBHOOK_TOKEN (and/or "
            "RAIOX_WEBHOOK_SECRET), or pass --insecure-no-auth for a closed test network"
        )
    if settings.notify_url and not (settings.notify_secret or settings.webhook_secret):
        raise UsageError(
            "RAIOX_NOTIFY_URL is set but nothing to sign notifications with: "
            "set RAIOX_NOTIFY_SECRET (or RAIOX_WEBHOOK_SECRET)"
        )
    if settings.webhook_secret:
        auth.secret_key(settings.webhook_secret)  # a malformed whsec_ fails now, not per request
    notify.notifiers(settings)  # a malformed RAIOX_SMTP_URL (or no sender) fails now too
    if settings.jotform_clinic_from_answer and not settings.jotform_form_ids:
        raise UsageError(
            "RAIOX_JOTFORM_CLINIC_FROM_ANSWER needs RAIOX_JOTFORM_FORM_IDS: a form answer "
            "names the clinic only on forms you list (docs/guides/clinics.md: one shared form)"
        )


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


def _source_address(request: Request) -> str:
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
    config: ServerConfig = request.app.state.config
    if config.insecure_no_auth:
        return auth.OPERATOR, None
    limiter: auth.FailureLimiter = request.app.state.limiter
    address = _source_address(request)
    limiter.check(address)
    try:
        return _identify(request, body, signed_delivery=signed_delivery)
    except auth.Unauthorized:
        limiter.failed(address)
        raise


def _identify(
    request: Request, body: bytes, *, signed_delivery: bool
) -> tuple[auth.Caller, str | None]:
    settings: Settings = request.app.state.config.settings
    provided = _credential(request)
    if provided and keys.looks_like_key(provided):
        clinic = _with_db(request, lambda conn: keys.authenticate(conn, provided))
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
    """FastAPI dependency: the authenticated caller of a request without a signed
    body (reads, lists, feedback). Pass `caller.clinic_id` to the scoped queries."""
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


def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape (schemas.ErrorResponse) of every 4xx and 5xx."""
    return JSONResponse(schemas.error_body(status, message), status_code=status, headers=headers)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    body = schemas.error_body(422, message[:300], detail=jsonable_encoder(problems))
    return JSONResponse(body, status_code=422)


def _crashed(_request: Request, exc: Exception) -> JSONResponse:
    # The middleware logs it (one line); the client learns nothing of the internals.
    return _error(500, "internal error")


def _refused_value(request: Request, exc: Exception) -> JSONResponse:
    """A value PostgreSQL refused: input validation missed a case. The client sent
    it, so the answer is a 400; the log says which check to add."""
    logs.event(
        "value refused by the database",
        logging.WARNING,
        path=request.url.path,
        error=inputs.for_log(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
    )
    return _error(400, "a request field holds a value that cannot be stored")


ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (auth.Unauthorized, 401),
    (keys.ClinicNotFound, 404),
    (jotform.FormNotAllowed, 403),
    (TooLarge, 413),
    (inputs.BadInput, 400),
    (images.ImageError, 422),
    (DatabaseUnavailable, 503),
    (search.EmptyCatalogue, 503),
    (search.ModelMismatch, 503),
    (feedback.UnknownAnalysis, 404),
    (feedback.AnalysisNotDone, 409),
    (feedback.UnknownImplant, 422),
    (feedback.BadConfirmation, 422),
]


def _with_db(
    request: Request, fn: Callable[[psycopg.Connection], Any], timeout_s: float = 10.0
) -> Any:
    return _with_pool(request.app, fn, timeout_s)


def _with_pool(
    app: FastAPI, fn: Callable[[psycopg.Connection], Any], timeout_s: float = 10.0
) -> Any:
    pool: psycopg_pool.ConnectionPool = app.state.pool
    try:
        with pool.connection(timeout=timeout_s) as conn:
            return fn(conn)
    except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc


def create_app(config: ServerConfig) -> FastAPI:
    settings = config.settings
    url = db.database_url(settings)
    logs.setup(settings.debug)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=config.pool_size,
            configure=register_vector,
            check=psycopg_pool.ConnectionPool.check_connection,  # survive a database restart
            kwargs={"connect_timeout": 5},
            open=False,
        )
        pool.open(wait=False)
        metrics.watch_pool(pool)
        stop_forward_timing = metrics.start_forward_timing()
        worker = Worker(
            settings,
            config.embedder,
            config.store,
            threads=config.worker_threads,
            poll_s=config.poll_s,
            metrics=metrics,
            batch=config.batch,
        )
        app.state.pool, app.state.worker = pool, worker
        worker.start()
        logs.event(
            "server ready",
            model_id=config.embedder.model_id,
            workers=config.worker_threads,
            batch=config.batch,
        )
        try:
            yield
        finally:
            released = await run_in_threadpool(worker.stop, config.shutdown_grace_s)
            stop_forward_timing()
            pool.close()
            logs.event("server stopped", released=len(released))

    app = FastAPI(
        title="raiox",
        version=__version__,
        summary="Identify the dental implant system in a radiograph.",
        lifespan=lifespan,
        # operationId = the handler's name (upload, get_analysis, ...): what generated
        # clients call their functions.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.config = config
    app.state.limiter = auth.FailureLimiter(
        settings.auth_max_failures,
        settings.auth_failure_window_s,
        run=functools.partial(_with_pool, app),
    )
    metrics = app.state.metrics = Metrics()

    @app.middleware("http")
    async def access_log(request: Request, call_next: Callable) -> Any:
        started = time.monotonic()
        request.state.analysis_id = None
        try:
            response = await call_next(request)
        except Exception:
            logs.event(
                "request crashed",
                logging.ERROR,
                method=request.method,
                path=_logged_path(request),
                exc_info=True,
            )
            metrics.requests.labels(request.method, route_of(request.scope), "500").inc()
            raise
        route = route_of(request.scope)
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.request_seconds.labels(route).observe(time.monotonic() - started)
        logs.event(
            "request",
            method=request.method,
            path=_logged_path(request),  # never the query string: it may hold ?token=
            status=response.status_code,
            ms=round((time.monotonic() - started) * 1000, 1),
            analysis_id=request.state.analysis_id,
        )
        return response

    # The pages (server/pages.py): forms answer a refused CSRF token with a page.
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    app.add_exception_handler(
        pages.CsrfFailed, lambda req, _exc: pages.message_page(req, "error.csrf", 403)
    )

    for error_class, status in ERROR_STATUS:
        app.add_exception_handler(
            error_class, lambda _req, exc, status=status: _error(status, str(exc))
        )
    app.add_exception_handler(psycopg.DataError, _refused_value)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _crashed)

    @app.exception_handler(auth.TooManyFailures)
    async def too_many_failures(_req: Request, exc: auth.TooManyFailures) -> JSONResponse:
        return _error(429, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.post(
        "/webhook",
        status_code=202,
        summary="Submit an X-ray by URL (JSON, or Jotform's multipart webhook)",
        response_model=schemas.Accepted,
        responses={
            200: {"model": schemas.AcceptedDone, "description": "Finished within ?wait=N"},
            **schemas.errors(400, 401, 403, 413, 422, 429, 503),
        },
        openapi_extra=openapi.WEBHOOK_EXTRA,
    )
    async def webhook(request: Request, wait: int = Query(0, ge=0, le=MAX_WAIT_S)) -> JSONResponse:
        """Record the submission (status pending) and answer 202 with its id; the
        same delivery again (Jotform submissionID or webhook-id) answers the same id.
        `?wait=N` waits up to N seconds for the result."""
        accept_started = time.monotonic()
        body = await read_body(request, settings.server_max_bytes)
        is_form = _is_form(request)
        caller, delivery_id = await run_in_threadpool(
            authenticate, request, body, signed_delivery=not is_form
        )
        allowed_forms = frozenset(
            f.strip() for f in (settings.jotform_form_ids or "").split(",") if f.strip()
        )
        if is_form:
            form = await parse_form(request.headers, body)
            submission = jotform.parse_jotform(
                {k: v for k, v in form.items() if isinstance(v, str)},
                # A clinic's key is enough for its own forms; the allow-list guards
                # the operator token's URL (and is what lets an answer name a clinic).
                allowed_form_ids=allowed_forms if caller.is_operator else frozenset(),
                client_field=settings.jotform_client_field,
                upload_field=settings.jotform_upload_field,
                email_field=settings.jotform_email_field,
            )
        else:
            delivery_id = (
                delivery_id
                or inputs.header(request.headers.get("webhook-id"), "webhook-id")
                or inputs.header(request.headers.get("idempotency-key"), "Idempotency-Key")
            )
            submission = jotform.parse_json(body, delivery_id)

        def record(conn: psycopg.Connection) -> tuple[int, bool, uuid.UUID]:
            clinic_id = caller.clinic_id
            if (
                clinic_id is None
                and is_form
                and settings.jotform_clinic_from_answer
                and allowed_forms  # parse_jotform refused any other form
                and submission.client_id
            ):
                clinic_id = queries.clinic_by_name(conn, submission.client_id)
            analysis_id, created = queries.create_analysis(
                conn,
                source="webhook",
                client_id=submission.client_id,
                clinic_id=clinic_id,
                idempotency_key=submission.idempotency_key,
                image_url=submission.image_url,
                metadata=submission.metadata,
                reply_email=submission.reply_email,
            )
            row = queries.get_analysis(conn, analysis_id)
            conn.commit()
            assert row is not None
            return analysis_id, created, row["public_id"]

        analysis_id, created, public_id = await run_in_threadpool(_with_db, request, record)
        request.state.analysis_id = public_id
        if created:
            request.app.state.worker.wake()
        logs.event("accepted" if created else "replayed", analysis_id=public_id)
        logs.audit("create" if created else "replay", client=caller.name, analysis=public_id)
        answer: dict[str, Any] = {
            "id": str(public_id),
            "status": "pending",
            "url": str(request.url_for("get_analysis", analysis_id=str(public_id))),
            "replayed": not created,
        }
        metrics.webhook_accept_seconds.observe(time.monotonic() - accept_started)
        if wait or not created:
            view = await run_in_threadpool(_wait_for, request, analysis_id, wait)
            answer.update(status=view["status"])
            if view["status"] in ("done", "failed"):
                return JSONResponse({**answer, **_json(view)}, status_code=200)
        return JSONResponse(answer, status_code=202)

    @app.post(
        "/upload",
        summary="Identify an uploaded X-ray now (multipart field 'file')",
        response_model=schemas.UploadResult,
        responses=schemas.errors(400, 401, 413, 422, 429, 503),
        openapi_extra=openapi.UPLOAD_EXTRA,
    )
    async def upload(request: Request, k: int = Query(3, ge=1, le=MAX_PAGE)) -> JSONResponse:
        """The old synchronous API: answers with the top-k implants."""
        body = await read_body(request, settings.server_max_bytes)
        caller, _ = await run_in_threadpool(authenticate, request, body, signed_delivery=False)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise jotform.BadSubmission("send the image as multipart/form-data field 'file'")
        form = await parse_form(request.headers, body)
        part = form.get("file") or form.get("image")
        if not isinstance(part, UploadFile):
            raise jotform.BadSubmission("no file in multipart field 'file'")
        data = await part.read()
        view = await run_in_threadpool(_analyse_now, request, caller, data, k)
        request.state.analysis_id = view["id"]
        logs.audit("create", client=caller.name, analysis=view["id"])
        return JSONResponse(_json(view))

    @app.get(
        "/analyses",
        summary="The caller's analyses, newest first",
        response_model=schemas.AnalysisPage,
        responses=schemas.errors(401, 422, 429, 503),
    )
    async def list_analyses(
        request: Request,
        caller: CurrentCaller,
        status: Literal["pending", "running", "done", "failed"] | None = None,
        since: dt.datetime | None = Query(None, description="created at or after (ISO 8601)"),
        limit: int = Query(20, ge=1, le=MAX_PAGE),
    ) -> JSONResponse:
        """A clinic sees its own analyses; the operator every clinic's."""
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=dt.timezone.utc)
        rows = await run_in_threadpool(
            _with_db,
            request,
            lambda conn: queries.list_analyses(
                conn, clinic_id=caller.clinic_id, status=status, since=since, limit=limit
            ),
        )
        items = [
            {
                **{k: v for k, v in row.items() if k != "public_id"},
                "id": str(row["public_id"]),
                "url": str(request.url_for("get_analysis", analysis_id=str(row["public_id"]))),
            }
            for row in rows
        ]
        logs.audit("list", client=caller.name, analysis=None, count=len(items))
        return JSONResponse(_json({"limit": limit, "items": items}))

    @app.get(
        "/analyses/{analysis_id}",
        name="get_analysis",
        summary="An analysis and its result",
        response_model=schemas.Analysis,
        responses=schemas.errors(401, 404, 422, 429, 503),
    )
    async def get_analysis(
        request: Request, analysis_id: PublicId, caller: CurrentCaller
    ) -> JSONResponse:
        """Another clinic's analysis answers 404, exactly like one that does not exist."""
        public_id = parse_public_id(analysis_id)
        view = None
        if public_id is not None:
            request.state.analysis_id = public_id
            view = await run_in_threadpool(
                _with_db,
                request,
                lambda conn: results.analysis_for(
                    conn, config.store, public_id, caller.clinic_id, settings.link_expires_s
                ),
            )
        if view is None:
            raise HTTPException(404, "no such analysis")
        logs.audit("read", client=caller.name, analysis=public_id)
        return JSONResponse(_json(view))

    @app.delete(
        "/analyses/{analysis_id}",
        status_code=204,
        summary="Delete an analysis and its stored X-ray",
        response_class=Response,
        responses=schemas.errors(401, 404, 422, 429, 503),
    )
    async def delete_analysis(
        request: Request, analysis_id: PublicId, caller: CurrentCaller
    ) -> Response:
        """The clinic's own analysis (404 for another clinic's, like a missing one);
        its image leaves the store unless another analysis shows the same bytes. Only
        an anonymous count is kept."""
        public_id = parse_public_id(analysis_id)

        def delete(conn: psycopg.Connection) -> bool:
            if public_id is None:
                return False
            row = queries.find_analysis(conn, public_id, clinic_id=caller.clinic_id)
            return row is not None and retention.delete_analysis(conn, config.store, row["id"])

        request.state.analysis_id = public_id
        if not await run_in_threadpool(_with_db, request, delete):
            raise HTTPException(404, "no such analysis")
        logs.audit("delete", client=caller.name, analysis=public_id)
        return Response(status_code=204)

    @app.post(
        "/analyses/{analysis_id}/feedback",
        status_code=201,
        summary="Confirm which implant an analysis really shows",
        response_model=schemas.Confirmation,
        responses=schemas.errors(400, 401, 404, 409, 413, 422, 429, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
            }
        },
    )
    async def post_feedback(request: Request, analysis_id: PublicId) -> JSONResponse:
        """Record the dentist's answer; answering again keeps the history and the
        latest answer counts. 201 with the confirmation (`raiox_rank`: where raiox
        had ranked that implant, null when it did not list it; `previous`: the answer
        this one replaces). 404 unknown analysis (or another clinic's), 409 analysis
        without a result yet, 422 unknown implant key or invalid body."""
        body = await read_body(request, FEEDBACK_MAX_BYTES)
        caller, _ = await run_in_threadpool(authenticate, request, body, signed_delivery=False)
        public_id = parse_public_id(analysis_id)
        if public_id is None:
            raise HTTPException(404, "no such analysis")
        request.state.analysis_id = public_id
        try:
            answer = FeedbackIn.model_validate_json(body)
        except ValidationError as exc:
            # Without the input: a body that is not UTF-8 cannot be echoed back as JSON.
            errors = exc.errors(include_url=False, include_input=False)
            raise RequestValidationError(errors) from None

        def record(conn: psycopg.Connection) -> feedback.Confirmation:
            done = feedback.confirm(
                conn,
                public_id,
                answer.implant_key,
                note=answer.note,
                # A clinic's key says who it is; only the operator's token may name one.
                client_id=answer.client_id if caller.is_operator else caller.name,
                clinic_id=caller.clinic_id,
            )
            conn.commit()
            return done

        done = await run_in_threadpool(_with_db, request, record)
        logs.audit("feedback", client=caller.name, analysis=public_id)
        return JSONResponse(_json(done.to_dict()), status_code=201)

    @app.get(
        "/analyses/{analysis_id}/sheet.png",
        summary="The contact sheet of a finished analysis (PNG), as `raiox search --sheet`",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
            **schemas.errors(401, 404, 409, 422, 429, 503),
        },
    )
    async def get_sheet(request: Request, analysis_id: PublicId, caller: CurrentCaller) -> Response:
        """Another clinic's analysis answers 404, exactly like one that does not exist."""
        public_id = parse_public_id(analysis_id)

        def draw(conn: psycopg.Connection) -> bytes | str | None:
            row = queries.find_analysis(conn, public_id, clinic_id=caller.clinic_id)
            if row is None or row["status"] != "done":
                return None if row is None else row["status"]
            return results.sheet_png(conn, config.store, row, settings.min_score)

        drawn = None
        if public_id is not None:
            request.state.analysis_id = public_id
            drawn = await run_in_threadpool(_with_db, request, draw)
        if drawn is None:
            raise HTTPException(404, "no such analysis")
        if isinstance(drawn, str):
            raise HTTPException(409, f"the analysis is {drawn}: no sheet until it is done")
        logs.audit("sheet", client=caller.name, analysis=public_id)
        return Response(drawn, media_type="image/png", headers={"cache-control": "private"})

    # The catalogue is not patient data: any authenticated caller may browse it.
    @app.get(
        "/implants",
        summary="The catalogue, a page at a time",
        dependencies=[Depends(current_caller)],
        response_model=schemas.ImplantPage,
        responses=schemas.errors(401, 422, 429, 503),
    )
    async def list_implants(
        request: Request,
        skip: int = Query(0, ge=0, le=MAX_SKIP),
        limit: int = Query(20, ge=1, le=MAX_PAGE),
    ) -> JSONResponse:
        def page(conn: psycopg.Connection) -> dict[str, Any]:
            items = queries.list_implants(conn, skip=skip, limit=limit)
            return {
                "total": queries.count_implants(conn),
                "skip": skip,
                "limit": limit,
                "items": items,
            }

        return JSONResponse(_json(await run_in_threadpool(_with_db, request, page)))

    @app.get(
        "/implants/{implant_id}",
        summary="One implant and its reference images",
        dependencies=[Depends(current_caller)],
        response_model=schemas.Implant,
        responses=schemas.errors(401, 404, 422, 429, 503),
    )
    async def get_implant(
        request: Request, implant_id: int = Path(ge=1, le=MAX_ID)
    ) -> JSONResponse:
        view = await run_in_threadpool(
            _with_db,
            request,
            lambda conn: results.implant(conn, config.store, implant_id, settings.link_expires_s),
        )
        if view is None:
            raise HTTPException(404, f"no implant {implant_id}")
        return JSONResponse(_json(view))

    @app.get(
        "/healthcheck",
        summary="Version, database, model and queue state",
        response_model=schemas.Health,
        responses={503: {"model": schemas.Health, "description": "Database down or queue stuck"}},
    )
    async def healthcheck(request: Request) -> JSONResponse:
        """503 when the database is unreachable, or when a due job has waited longer
        than RAIOX_HEALTH_STUCK_S for a worker (the queue is stuck)."""

        def state(conn: psycopg.Connection) -> tuple[int, float | None]:
            queries.ping(conn)
            return queries.count_pending_jobs(conn), queries.oldest_due_job_age_s(conn)

        answer: dict[str, Any] = {"version": __version__, "model_id": config.embedder.model_id}
        try:
            pending, oldest = await run_in_threadpool(_with_db, request, state, 3.0)
        except DatabaseUnavailable:
            return JSONResponse({**answer, "status": "error", "database": False}, 503)
        stuck = oldest is not None and oldest > settings.health_stuck_s
        answer.update(
            status="stuck" if stuck else "ok",
            database=True,
            pending=pending,
            oldest_due_s=None if oldest is None else round(oldest, 1),
        )
        return JSONResponse(answer, 503 if stuck else 200)

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text format)",
        response_class=Response,
        responses={
            200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}},
            **schemas.errors(401, 403, 429, 503),
        },
    )
    async def prometheus_metrics(caller: CurrentCaller) -> Response:
        """For the operator's token (they count every clinic's work; a clinic key gets
        403). RAIOX_METRICS_PORT serves them on a separate port instead (bound to
        RAIOX_METRICS_HOST, loopback by default)."""
        if not caller.is_operator:
            raise HTTPException(403, "metrics need the operator token (RAIOX_WEBHOOK_TOKEN)")
        body = await run_in_threadpool(metrics.render)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    openapi.install(app)
    return app


def _logged_path(request: Request) -> str:
    """The path for the access log: a result page's signed token is a credential
    for that result, so it is left out like the query string."""
    path = request.url.path
    if not path.startswith("/r/"):
        return path
    _token, slash, rest = path[len("/r/") :].partition("/")
    return "/r/<token>" + slash + rest


def _json(data: dict[str, Any]) -> dict[str, Any]:
    from fastapi.encoders import jsonable_encoder

    # Timestamps in UTC with an explicit offset, whatever the session's time zone.
    return jsonable_encoder(data, custom_encoder={dt.datetime: utc.iso})


def _wait_for(request: Request, analysis_id: int, wait_s: float) -> dict[str, Any]:
    config: ServerConfig = request.app.state.config
    expires = config.settings.link_expires_s
    latest: dict[str, Any] = {}

    def ended() -> bool:
        view = _with_db(
            request, lambda conn: results.analysis(conn, config.store, analysis_id, expires)
        )
        latest.update(view or {})
        return latest.get("status") in ("done", "failed")

    request.app.state.worker.wait(analysis_id, wait_s, ended)
    return latest


def _analyse_now(request: Request, caller: auth.Caller, data: bytes, k: int) -> dict[str, Any]:
    config: ServerConfig = request.app.state.config
    settings = config.settings
    loaded = images.load_image(
        data, max_pixels=settings.max_pixels, max_bytes=settings.server_max_bytes
    )

    def run(conn: psycopg.Connection) -> dict[str, Any]:
        search.catalogue_model(conn, config.embedder.model_id)
        key = privacy.store_image(config.store, data, loaded.format, settings)
        analysis_id, _ = queries.create_analysis(
            conn,
            source="upload",
            clinic_id=caller.clinic_id,
            image_sha256=loaded.sha256,
            storage_key=key,
            status="running",
        )
        result = search.search_image(
            conn,
            config.embedder,
            loaded,
            k=k,
            ef_search=settings.ef_search,
            min_score=settings.min_score,
            min_margin=settings.min_margin,
            tta=settings.tta,
        )
        queries.finish_analysis(
            conn,
            analysis_id,
            model_id=result.model_id,
            matches=result.matches,
            trust=search.stored_trust(result),
        )
        conn.commit()
        view = results.analysis(conn, config.store, analysis_id, settings.link_expires_s)
        assert view is not None
        return {**view, "confident": result.confident}

    return _with_db(request, run)


def _graceful_server(config: Any) -> Any:
    """A uvicorn server for which SIGTERM, SIGINT and SIGHUP are a graceful stop that
    *returns*: uvicorn re-raises the signal after shutdown, which kills Python on
    SIGTERM before its atexit hooks (the embedded database's stop) and exits 143."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker_threads: int = 2,
    insecure_no_auth: bool = False,
    batch: int = BATCH,
) -> None:
    """Load everything, then open the port; returns when the server has stopped,
    also when a stop signal came while it was still loading (a normal end: exit 0)."""
    try:
        _load(settings, host, port, worker_threads, insecure_no_auth, batch).run()
    except Terminated as exc:  # before uvicorn took the signals over
        logs.event("stopped while starting", signal=signal.Signals(exc.signum).name)


def _load(
    settings: Settings,
    host: str,
    port: int,
    worker_threads: int,
    insecure_no_auth: bool,
    batch: int,
) -> Any:
    import uvicorn

    from raiox_cli import embedding
    from raiox_cli.store import objects as storage

    check_auth_configured(settings, insecure_no_auth)
    if worker_threads < 1:
        raise UsageError("--workers-threads must be at least 1")
    with db.connect(settings) as conn:
        db.check_schema(conn)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    store = storage.open_store(settings)
    if insecure_no_auth:
        logs.event("AUTHENTICATION DISABLED (--insecure-no-auth)", logging.WARNING)
    app = create_app(
        ServerConfig(settings, embedder, store, insecure_no_auth, worker_threads, batch=batch)
    )
    server = _graceful_server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,  # ours (above) leaves out query strings, which may hold ?token=
            proxy_headers=True,
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
        )
    )
    if settings.metrics_port:
        from prometheus_client import start_http_server

        # Unauthenticated, so loopback by default: for a Prometheus on the same host.
        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=app.state.metrics.registry
        )
        logs.event("metrics listening", host=settings.metrics_host, port=settings.metrics_port)
    logs.event("listening", host=host, port=port, model_id=embedder.model_id)
    return server
