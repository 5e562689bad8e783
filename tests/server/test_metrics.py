"""/metrics in Prometheus text format, and /healthcheck going unhealthy when the
queue is stuck: the real server on loopback, real jobs."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from raiox_cli import db
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, Site, poll, running

AUTH = {"authorization": f"Bearer {TOKEN}"}


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"{base}/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):  # parses, or raises
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_when_jobs_run(
    catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    with running(
        catalogue, tiny_embedder, webhook_token=TOKEN, download_allow_loopback=True
    ) as base:
        assert httpx.get(f"{base}/metrics").status_code == 401  # protected like the API
        before = scrape(base)
        assert value(before, "raiox_queue_jobs", status="done") == 0
        done = httpx.post(
            f"{base}/webhook", json={"image_url": site.base + "/xray.png"}, headers=AUTH
        ).json()
        missing = httpx.post(
            f"{base}/webhook", json={"image_url": site.base + "/gone.png"}, headers=AUTH
        ).json()
        assert poll(done["url"], headers=AUTH)["status"] == "done"
        assert poll(missing["url"], headers=AUTH)["status"] == "failed"
        after = scrape(base)

    assert value(after, "raiox_jobs_total", outcome="done") == 1
    assert value(after, "raiox_jobs_total", outcome="failed") == 1
    assert value(after, "raiox_job_duration_seconds_count", outcome="done") == 1
    assert value(after, "raiox_job_attempts_count") == 2
    assert value(after, "raiox_download_failures_total", reason="http_4xx") == 1
    assert value(after, "raiox_queue_jobs", status="done") == 1
    assert value(after, "raiox_queue_jobs", status="failed") == 1
    assert value(after, "raiox_model_forward_seconds_count") >= 1
    assert value(after, "raiox_model_images_total") >= 1
    assert value(after, "raiox_webhook_accept_seconds_count") == 2
    assert (
        value(after, "raiox_http_requests_total", method="POST", route="/webhook", status="202")
        == 2
    )
    # Route templates, never raw paths: label values stay bounded.
    routes = {dict(labels).get("route") for (name, labels) in after if "http_requests" in name}
    assert "/analyses/{analysis_id}" in routes and not any(
        r and r.startswith("/analyses/1") for r in routes
    )
    assert value(after, "raiox_db_pool_connections", state="max") >= 1


def test_healthcheck_is_503_when_a_due_job_waits_too_long(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    with db.connect(catalogue.settings) as conn:
        job = conn.execute(
            """INSERT INTO analyses (source, image_url, next_attempt_at)
               VALUES ('webhook', 'https://a.example/x.png', now() - interval '2 hours')
               RETURNING id"""
        ).fetchone()
        conn.commit()
    # A worker that hangs on a job holds its row; SKIP LOCKED makes the others pass it by.
    holder = psycopg.connect(db.database_url(catalogue.settings))
    holder.execute("SELECT 1 FROM analyses WHERE id = %s FOR UPDATE", (job[0],))
    try:
        with running(catalogue, tiny_embedder, webhook_token=TOKEN, health_stuck_s=600) as base:
            answer = httpx.get(f"{base}/healthcheck")
            assert answer.status_code == 503, answer.text
            body = answer.json()
            assert body["status"] == "stuck" and body["oldest_due_s"] > 7000
            assert body["database"] is True and body["pending"] == 1
        with running(catalogue, tiny_embedder, webhook_token=TOKEN, health_stuck_s=86400) as base:
            answer = httpx.get(f"{base}/healthcheck")
            assert answer.status_code == 200 and answer.json()["status"] == "ok"
    finally:
        holder.rollback()
        holder.close()


def test_metrics_on_a_separate_port(catalogue: Catalogue, tiny_embedder: Any) -> None:
    from prometheus_client import start_http_server

    from raiox_cli.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(catalogue.settings, tiny_embedder, catalogue.store))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=app.state.metrics.registry)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"raiox_http_requests", "raiox_jobs", "raiox_model_forward_seconds"} <= names
    finally:
        server.shutdown()
        thread.join(5)
