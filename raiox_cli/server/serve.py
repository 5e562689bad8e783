"""`raiox serve-webhook-minimal`: load the model and the store, then run the app
(server/app.py) on uvicorn until a stop signal, gracefully."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from raiox_cli import db, embedding
from raiox_cli.config import Settings
from raiox_cli.errors import UsageError
from raiox_cli.lifecycle import Terminated
from raiox_cli.server import logs
from raiox_cli.server.app import check_auth_configured, create_app
from raiox_cli.server.deps import SHUTDOWN_GRACE_S, ServerConfig
from raiox_cli.server.worker import BATCH
from raiox_cli.store import objects as storage


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
    # Here, not at the top: uvicorn's import is slow and only serving needs it.
    import uvicorn

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
            access_log=False,  # ours (handlers.py) leaves out query strings: ?token=
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
