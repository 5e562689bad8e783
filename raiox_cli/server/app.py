"""The HTTP app (FastAPI), wired together: the pool and the worker for its lifetime,
the routers (routes/api.py, ops.py, pages.py), the error answers and the access log
(handlers.py), the /v1 prefix and its OpenAPI document (openapi.py).

`raiox serve-webhook-minimal` runs it on uvicorn (server/serve.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import psycopg_pool
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pgvector.psycopg import register_vector
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from raiox_cli import __version__, db
from raiox_cli.clinics import keys
from raiox_cli.config import Settings
from raiox_cli.errors import UsageError
from raiox_cli.server import auth, docs, handlers, logs, notify, openapi
from raiox_cli.server.deps import ServerConfig, with_pool
from raiox_cli.server.metrics import Metrics
from raiox_cli.server.routes import api, ops, pages
from raiox_cli.server.worker import Worker

__all__ = ["ServerConfig", "check_auth_configured", "create_app"]


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
    keys.check_timezone(settings.timezone, "RAIOX_TIMEZONE")
    if settings.jotform_clinic_from_answer and not settings.jotform_form_ids:
        raise UsageError(
            "RAIOX_JOTFORM_CLINIC_FROM_ANSWER needs RAIOX_JOTFORM_FORM_IDS: a form answer "
            "names the clinic only on forms you list (docs/guides/clinics.md: one shared form)"
        )


def _not_found_page(request: Request, exc: Exception) -> Response:
    """A browser asking for a path that is nowhere gets the not-found page; an API
    client (and any answer a route gave) the JSON error."""
    assert isinstance(exc, StarletteHTTPException)
    unmatched = exc.status_code == 404 and request.scope.get("route") is None
    if unmatched and "text/html" in request.headers.get("accept", ""):
        return pages.message_page(request, "error.no_page", 404)
    return handlers.http_error(request, exc)


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
        docs_url=None,  # server/docs.py serves them without CDNs
        redoc_url=None,
        # operationId = the handler's name (upload, get_analysis, ...): what generated
        # clients call their functions.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.config = config
    app.state.limiter = auth.FailureLimiter(
        settings.auth_max_failures,
        settings.auth_failure_window_s,
        run=functools.partial(with_pool, app),
    )
    metrics = app.state.metrics = Metrics()
    app.middleware("http")(handlers.access_log)

    # The pages: forms answer a refused CSRF token with a page, not JSON.
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    app.add_exception_handler(
        pages.CsrfFailed, lambda req, _exc: pages.message_page(req, "error.csrf", 403)
    )
    handlers.install(app)
    app.add_exception_handler(StarletteHTTPException, _not_found_page)
    app.include_router(api.router)
    app.include_router(ops.router)
    docs.install(app)
    openapi.install(app)
    return app
