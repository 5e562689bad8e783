"""raiox serve-webhook-minimal: the HTTP server (API, pages, webhook receiver)."""

from __future__ import annotations

from typing import Annotated

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import MODEL, settings

app = group()


@command(app, "serve-webhook-minimal")
@settings(*MODEL)
def serve_webhook_minimal(
    host: Annotated[str, typer.Option(help="address to bind (put nginx in front)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    workers_threads: Annotated[
        int, typer.Option("--workers-threads", min=1, max=64, help="job worker threads")
    ] = 2,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            max=64,
            help="jobs a worker thread claims and embeds in one forward pass (1: one at a time)",
        ),
    ] = 8,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="start without RAIOX_WEBHOOK_TOKEN / RAIOX_WEBHOOK_SECRET (closed networks only)",
        ),
    ] = False,
    *,
    settings: config.Settings,
) -> None:
    """Receive X-rays from Jotform or any client over HTTP; answer with implants.

    Jobs are kept in PostgreSQL and survive restarts. Authentication comes from
    RAIOX_WEBHOOK_TOKEN (header or ?token=) and/or RAIOX_WEBHOOK_SECRET (Standard
    Webhooks signatures); see docs/guides/server.md. Logs: JSON lines on stderr.

    Example: RAIOX_WEBHOOK_TOKEN=... raiox serve-webhook-minimal --port 8000 --workers-threads 2
    """
    from raiox_cli.server import serve as server  # start-up time: FastAPI, the model

    server.serve(
        settings,
        host=host,
        port=port,
        worker_threads=workers_threads,
        insecure_no_auth=insecure_no_auth,
        batch=batch,
    )
