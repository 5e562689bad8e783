"""How the server answers what went wrong, and what it logs of every request: the
one error shape (schemas.ErrorResponse) for each exception class, and the access
log with its metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from raiox_cli import images
from raiox_cli.clinics import feedback, keys
from raiox_cli.errors import DatabaseUnavailable
from raiox_cli.search import query as search
from raiox_cli.server import auth, inputs, jotform, logs, schemas
from raiox_cli.server.deps import TooLarge
from raiox_cli.server.metrics import route_of

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


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape (schemas.ErrorResponse) of every 4xx and 5xx."""
    return JSONResponse(schemas.error_body(status, message), status_code=status, headers=headers)


def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error(exc.status_code, str(exc.detail), headers)


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this path (RFC 9110 15.5.6): Starlette names
    only the first route whose path matched (GET, not DELETE, on /analyses/{id})."""
    scope = {**request.scope, "method": "GET"}
    methods: set[str] = set()
    for route in _leaf_routes(request.app.routes):
        if route.matches(scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _leaf_routes(routes: Any) -> Any:
    for route in routes:
        inner = getattr(route, "routes", None)
        if inner is None and getattr(route, "original_router", None) is not None:
            inner = route.original_router.routes  # an included router (FastAPI's wrapper)
        if inner is not None and getattr(route, "methods", None) is None:
            yield from _leaf_routes(inner)
        else:
            yield route


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
    return error(500, "internal error")


def _refused_value(request: Request, exc: Exception) -> JSONResponse:
    """A value PostgreSQL refused: input validation missed a case. The client sent
    it, so the answer is a 400; the log says which check to add."""
    logs.event(
        "value refused by the database",
        logging.WARNING,
        path=request.url.path,
        error=inputs.for_log(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
    )
    return error(400, "a request field holds a value that cannot be stored")


def _too_many_failures(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, auth.TooManyFailures)
    return error(429, str(exc), {"Retry-After": str(exc.retry_after_s)})


def install(app: FastAPI) -> None:
    """Every exception class its answer (the pages add their own, for forms)."""
    for error_class, status in ERROR_STATUS:
        app.add_exception_handler(
            error_class, lambda _req, exc, status=status: error(status, str(exc))
        )
    app.add_exception_handler(psycopg.DataError, _refused_value)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _crashed)
    app.add_exception_handler(auth.TooManyFailures, _too_many_failures)


SIGNED_PATHS = ("/r/", "/images/", "/v1/images/")  # the token in them is a credential


def logged_path(request: Request) -> str:
    """The path for the access log: the signed token of a result page or a stored
    image opens what it names, so it is left out like the query string."""
    path = request.url.path
    for prefix in SIGNED_PATHS:
        if path.startswith(prefix):
            _token, slash, rest = path[len(prefix) :].partition("/")
            return prefix + "<token>" + slash + rest
    return path


async def access_log(request: Request, call_next: Callable) -> Any:
    """One line and the request metrics per request; routes name the analysis in
    `request.state.analysis_id`."""
    metrics = request.app.state.metrics
    started = time.monotonic()
    request.state.analysis_id = None
    try:
        response = await call_next(request)
    except Exception:
        logs.event(
            "request crashed",
            logging.ERROR,
            method=request.method,
            path=logged_path(request),
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
        path=logged_path(request),  # never the query string: it may hold ?token=
        status=response.status_code,
        ms=round((time.monotonic() - started) * 1000, 1),
        analysis_id=request.state.analysis_id,
    )
    return response
