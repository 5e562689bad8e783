"""The HTTP app (FastAPI on uvicorn) and `serve`, which the CLI command calls.

Requests only validate, authenticate and record; the work happens in the
worker threads (server/worker.py) so a slow download or model never holds a
connection from Jotform open, and nothing accepted is lost when the process is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import psycopg
import psycopg_pool
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pgvector.psycopg import register_vector
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from raiox_cli import __version__, clients, db, feedback, images, queries, search
from raiox_cli.config import Settings
from raiox_cli.embedding import Embedder
from raiox_cli.errors import DatabaseUnavailable, RaioxError, UsageError
from raiox_cli.server import auth, jotform, logs, notify, results
from raiox_cli.server.worker import CONTENT_TYPES, Store, Worker

MAX_WAIT_S = 60
MAX_PAGE = 100
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
            "names the clinic only on forms you list (README: shared Jotform form)"
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
    if provided and clients.looks_like_key(provided):
        clinic = _with_db(request, lambda conn: clients.authenticate(conn, provided))
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


def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (auth.Unauthorized, 401),
    (clients.ClientNotFound, 404),
    (jotform.FormNotAllowed, 403),
    (TooLarge, 413),
    (jotform.BadSubmission, 400),
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
    pool: psycopg_pool.ConnectionPool = request.app.state.pool
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
        worker = Worker(
            settings,
            config.embedder,
            config.store,
            threads=config.worker_threads,
            poll_s=config.poll_s,
        )
        app.state.pool, app.state.worker = pool, worker
        worker.start()
        logs.event("server ready", model_id=config.embedder.model_id, workers=config.worker_threads)
        try:
            yield
        finally:
            released = await run_in_threadpool(worker.stop, config.shutdown_grace_s)
            pool.close()
            logs.event("server stopped", released=len(released))

    app = FastAPI(
        title="raiox",
        version=__version__,
        summary="Identify the dental implant system in a radiograph.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.limiter = auth.FailureLimiter(
        settings.auth_max_failures, settings.auth_failure_window_s
    )

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
                path=request.url.path,
                exc_info=True,
            )
            raise
        logs.event(
            "request",
            method=request.method,
            path=request.url.path,  # never the query string: it may hold ?token=
            status=response.status_code,
            ms=round((time.monotonic() - started) * 1000, 1),
            analysis_id=request.state.analysis_id,
        )
        return response

    for error_class, status in ERROR_STATUS:
        app.add_exception_handler(
            error_class, lambda _req, exc, status=status: _error(status, str(exc))
        )

    @app.exception_handler(auth.TooManyFailures)
    async def too_many_failures(_req: Request, exc: auth.TooManyFailures) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status_code=429,
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.post(
        "/webhook",
        status_code=202,
        summary="Submit an X-ray by URL (JSON, or Jotform's multipart webhook)",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image_url"],
                            "properties": {
                                "image_url": {"type": "string"},
                                "client_id": {"type": "string"},
                                "metadata": {"type": "object"},
                            },
                        }
                    },
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                k: {"type": "string"}
                                for k in ("formID", "submissionID", "formTitle", "rawRequest")
                            },
                        }
                    },
                }
            }
        },
    )
    async def webhook(request: Request, wait: int = Query(0, ge=0, le=MAX_WAIT_S)) -> JSONResponse:
        """Record the submission (status pending) and answer 202 with its id; the
        same delivery again (Jotform submissionID or webhook-id) answers the same id.
        `?wait=N` waits up to N seconds for the result."""
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
                or request.headers.get("webhook-id")
                or request.headers.get("idempotency-key")
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
        if wait or not created:
            view = await run_in_threadpool(_wait_for, request, analysis_id, wait)
            answer.update(status=view["status"])
            if view["status"] in ("done", "failed"):
                return JSONResponse({**answer, **_json(view)}, status_code=200)
        return JSONResponse(answer, status_code=202)

    @app.post("/upload", summary="Identify an uploaded X-ray now (multipart field 'file')")
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

    @app.get("/analyses", summary="The caller's analyses, newest first")
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

    @app.get("/analyses/{analysis_id}", name="get_analysis", summary="An analysis and its result")
    async def get_analysis(
        request: Request, analysis_id: str, caller: CurrentCaller
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

    @app.post(
        "/analyses/{analysis_id}/feedback",
        status_code=201,
        summary="Confirm which implant an analysis really shows",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
            }
        },
    )
    async def post_feedback(request: Request, analysis_id: str) -> JSONResponse:
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
            raise RequestValidationError(exc.errors(include_url=False)) from None

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
        responses={200: {"content": {"image/png": {}}}, 404: {}, 409: {}},
    )
    async def get_sheet(request: Request, analysis_id: str, caller: CurrentCaller) -> Response:
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
    )
    async def list_implants(
        request: Request,
        skip: int = Query(0, ge=0),
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
    )
    async def get_implant(request: Request, implant_id: int) -> JSONResponse:
        view = await run_in_threadpool(
            _with_db,
            request,
            lambda conn: results.implant(conn, config.store, implant_id, settings.link_expires_s),
        )
        if view is None:
            raise HTTPException(404, f"no implant {implant_id}")
        return JSONResponse(_json(view))

    @app.get("/healthcheck", summary="Version, database, model and queue state")
    async def healthcheck(request: Request) -> JSONResponse:
        def state(conn: psycopg.Connection) -> int:
            queries.ping(conn)
            return queries.count_pending_jobs(conn)

        answer: dict[str, Any] = {"version": __version__, "model_id": config.embedder.model_id}
        try:
            pending = await run_in_threadpool(_with_db, request, state, 3.0)
        except DatabaseUnavailable:
            return JSONResponse({**answer, "status": "error", "database": False}, 503)
        return JSONResponse({**answer, "status": "ok", "database": True, "pending": pending})

    return app


def _json(data: dict[str, Any]) -> dict[str, Any]:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(data)


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
        key = config.store.put(loaded.sha256, data, content_type=CONTENT_TYPES.get(loaded.format))
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
        )
        queries.finish_analysis(conn, analysis_id, model_id=result.model_id, matches=result.matches)
        conn.commit()
        view = results.analysis(conn, config.store, analysis_id, settings.link_expires_s)
        assert view is not None
        return {**view, "confident": result.confident}

    return _with_db(request, run)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker_threads: int = 2,
    insecure_no_auth: bool = False,
) -> None:
    """Load everything, then open the port; returns when the server has stopped."""
    import uvicorn

    from raiox_cli import embedding, storage

    check_auth_configured(settings, insecure_no_auth)
    if worker_threads < 1:
        raise UsageError("--workers-threads must be at least 1")
    with db.connect(settings) as conn:
        db.check_schema(conn)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    store = storage.open_store(settings)
    if insecure_no_auth:
        logs.event("AUTHENTICATION DISABLED (--insecure-no-auth)", logging.WARNING)
    app = create_app(ServerConfig(settings, embedder, store, insecure_no_auth, worker_threads))
    server = uvicorn.Server(
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
    logs.event("listening", host=host, port=port, model_id=embedder.model_id)
    server.run()
