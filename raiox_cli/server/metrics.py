"""Prometheus metrics of one server process (prometheus-client, its own registry).

Counters and histograms are updated where things happen (requests, jobs, downloads,
notifications, forward passes); the queue and the connection pool are read when
Prometheus scrapes, so they are never stale. One registry per app, not the global
one: tests and embedders may create several apps in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from raiox_cli import embedding
from raiox_cli.db import queries
from raiox_cli.server import logs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Live(Collector):
    """Queue depth by status, the oldest due job's age, and pool use, read at scrape."""

    def __init__(self, pool: Callable[[], psycopg_pool.ConnectionPool | None]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self._pool()
        if pool is None:
            return
        stats = pool.get_stats()
        use = GaugeMetricFamily(
            "raiox_db_pool_connections", "Database pool connections by state", labels=["state"]
        )
        size = stats.get("pool_size", 0)
        available = stats.get("pool_available", 0)
        use.add_metric(["in_use"], size - available)
        use.add_metric(["idle"], available)
        use.add_metric(["max"], pool.max_size)
        yield use
        waiting = GaugeMetricFamily(
            "raiox_db_pool_waiting", "Requests waiting for a database connection"
        )
        waiting.add_metric([], stats.get("requests_waiting", 0))
        yield waiting
        try:
            with pool.connection(timeout=2.0) as conn:
                depth = queries.queue_depth(conn)
                oldest = queries.oldest_due_job_age_s(conn)
        except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
            logs.event("metrics: queue unreadable", logging.WARNING, error=type(exc).__name__)
            return
        queue = GaugeMetricFamily(
            "raiox_queue_jobs", "Analyses in the job queue by status", labels=["status"]
        )
        for status in ("pending", "running", "done", "failed"):
            queue.add_metric([status], depth.get(status, 0))
        yield queue
        age = GaugeMetricFamily(
            "raiox_queue_oldest_due_seconds",
            "Age of the oldest job that is due and not yet taken (0 when none)",
        )
        age.add_metric([], oldest or 0.0)
        yield age


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "raiox_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "raiox_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["route"],
            buckets=FAST,
            registry=r,
        )
        self.webhook_accept_seconds = Histogram(
            "raiox_webhook_accept_seconds",
            "Time to record a webhook delivery and answer 202",
            buckets=FAST,
            registry=r,
        )
        self.jobs = Counter(
            "raiox_jobs", "Finished job attempts by outcome", ["outcome"], registry=r
        )
        self.job_seconds = Histogram(
            "raiox_job_duration_seconds",
            "Duration of one job attempt (download, decode, embed, search, record)",
            ["outcome"],
            buckets=SLOW,
            registry=r,
        )
        self.job_attempts = Histogram(
            "raiox_job_attempts",
            "Attempt number at which a job ended (done or failed)",
            buckets=(1, 2, 3, 4, 5, 8),
            registry=r,
        )
        self.download_failures = Counter(
            "raiox_download_failures",
            "Failed downloads of submitted image URLs by reason",
            ["reason"],
            registry=r,
        )
        self.notifications = Counter(
            "raiox_notifications",
            "Result notifications by state (sent, retry, failed)",
            ["channel", "state"],
            registry=r,
        )
        self.forward_seconds = Histogram(
            "raiox_model_forward_seconds",
            "Model forward pass time per batch",
            buckets=FAST,
            registry=r,
        )
        self.forward_images = Counter("raiox_model_images", "Images through the model", registry=r)
        self._pool: psycopg_pool.ConnectionPool | None = None
        r.register(_Live(lambda: self._pool))

    def watch_pool(self, pool: psycopg_pool.ConnectionPool) -> None:
        self._pool = pool

    def forward(self, images: int, seconds: float) -> None:
        self.forward_seconds.observe(seconds)
        self.forward_images.inc(images)

    def start_forward_timing(self) -> Callable[[], None]:
        """Count this process's forward passes; returns the function that stops it."""
        embedding.forward_observers.append(self.forward)
        return lambda: embedding.forward_observers.remove(self.forward)

    def job_ended(self, outcome: str, attempt: int, started: float) -> None:
        self.jobs.labels(outcome).inc()
        self.job_seconds.labels(outcome).observe(time.monotonic() - started)
        if outcome in ("done", "failed"):
            self.job_attempts.observe(attempt)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_of(scope: dict[str, Any]) -> str:
    """The route template (`/analyses/{analysis_id}`), never the raw path: bounded labels."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
