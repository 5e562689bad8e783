"""What an operator's tools ask: the health check (load balancers, systemd) and
the Prometheus metrics."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from raiox_cli import __version__
from raiox_cli.db import queries
from raiox_cli.errors import DatabaseUnavailable
from raiox_cli.server import schemas
from raiox_cli.server.deps import CurrentCaller, server_config, with_db
from raiox_cli.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

HEALTH_DB_TIMEOUT_S = 3.0  # a health check answers quickly, even when the pool is busy

router = APIRouter()


@router.get(
    "/healthcheck",
    summary="Version, database, model and queue state",
    response_model=schemas.Health,
    responses={503: {"model": schemas.Health, "description": "Database down or queue stuck"}},
)
async def healthcheck(request: Request) -> JSONResponse:
    """503 when the database is unreachable, or when a due job has waited longer
    than RAIOX_HEALTH_STUCK_S for a worker (the queue is stuck)."""
    config = server_config(request)

    def state(conn: psycopg.Connection) -> tuple[int, float | None]:
        queries.ping(conn)
        return queries.count_pending_jobs(conn), queries.oldest_due_job_age_s(conn)

    answer: dict[str, Any] = {"version": __version__, "model_id": config.embedder.model_id}
    try:
        pending, oldest = await run_in_threadpool(with_db, request, state, HEALTH_DB_TIMEOUT_S)
    except DatabaseUnavailable:
        return JSONResponse({**answer, "status": "error", "database": False}, 503)
    stuck = oldest is not None and oldest > config.settings.health_stuck_s
    answer.update(
        status="stuck" if stuck else "ok",
        database=True,
        pending=pending,
        oldest_due_s=None if oldest is None else round(oldest, 1),
    )
    return JSONResponse(answer, 503 if stuck else 200)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={
        200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}},
        **schemas.errors(401, 403, 429, 503),
    },
)
async def prometheus_metrics(request: Request, caller: CurrentCaller) -> Response:
    """For the operator's token (they count every clinic's work; a clinic key gets
    403). RAIOX_METRICS_PORT serves them on a separate port instead (bound to
    RAIOX_METRICS_HOST, loopback by default)."""
    if not caller.is_operator:
        raise HTTPException(403, "metrics need the operator token (RAIOX_WEBHOOK_TOKEN)")
    body = await run_in_threadpool(request.app.state.metrics.render)
    return Response(body, media_type=METRICS_CONTENT_TYPE)
