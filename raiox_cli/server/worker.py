"""The job worker: threads that claim analyses from PostgreSQL and run them.

Durability comes from the table, not from memory: a job is claimed with
`FOR UPDATE SKIP LOCKED` under a lease (`locked_until`); if this process dies,
the lease runs out and any server claims the job again. Transient failures
(network, storage, database) retry with exponential backoff up to
`job_max_attempts`; permanent ones (refused URL, not an image) fail at once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from raiox_cli import analyses, db, images
from raiox_cli.catalogue import pipeline
from raiox_cli.clinics import links, privacy
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import Embedder
from raiox_cli.errors import EmptyCatalogue, ModelMismatch, RaioxError
from raiox_cli.search import query as search
from raiox_cli.server import download, i18n, logs, notify, results
from raiox_cli.server.metrics import Metrics
from raiox_cli.store.objects import Store

TOP_K = 3
POLL_S = 1.0
BATCH = 8  # jobs one worker thread claims and embeds in one forward pass
BATCH_WAIT_S = 0.005  # how long a short batch waits for more jobs to arrive
MAX_BACKOFF_S = 600.0
NOTIFY_MAX_ATTEMPTS = 8
NOTIFY_LEASE_S = 60.0


class JobFailed(RaioxError):
    def __init__(self, message: str, *, transient: bool, kind: str = "internal") -> None:
        super().__init__(message)
        self.transient = transient
        self.kind = kind  # image, download, catalogue, internal: what a page can explain


def backoff_s(attempt: int, base_s: float) -> float:
    return min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempt - 1))


def _classify(exc: Exception) -> JobFailed:
    """A job error, told apart into worth-retrying and final."""
    if isinstance(exc, JobFailed):
        return exc
    if isinstance(exc, download.UnsafeURL):
        return JobFailed(f"download refused: {exc}", transient=False, kind="download")
    if isinstance(exc, download.DownloadError):
        return JobFailed(f"download failed: {exc}", transient=exc.transient, kind="download")
    if isinstance(exc, images.ImageError):
        return JobFailed(f"not a usable image: {exc}", transient=False, kind="image")
    if isinstance(exc, (EmptyCatalogue, ModelMismatch)):
        return JobFailed(str(exc), transient=False, kind="catalogue")
    if isinstance(exc, psycopg.Error):
        return JobFailed(f"database error: {type(exc).__name__}", transient=True)
    # Storage clients raise many classes (botocore, OSError); all worth a retry.
    return JobFailed(f"{type(exc).__name__}: {exc}", transient=True)


@dataclass
class _Claim:
    analysis_id: int
    attempt: int
    public_id: str  # what logs say: the id a request's log line and the API show


class Worker:
    """N threads running jobs and notifications; `wait` serves ?wait=N requests."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: Store,
        *,
        threads: int = 2,
        poll_s: float = POLL_S,
        connect: Callable[[], psycopg.Connection] | None = None,
        metrics: Metrics | None = None,
        batch: int = BATCH,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.embedder = embedder
        self.store = store
        self.threads = threads
        self.poll_s = poll_s
        self.batch = max(1, batch)
        self.policy = download.DownloadPolicy.from_settings(settings)
        self._connect = connect or (lambda: db.connect(settings))
        self.notifiers = notify.notifiers(settings)
        self.channels = analyses.Channels.of(settings)  # what `finished` queues
        self.links = results.Links.for_worker(store, settings)  # in notifications
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._finished = threading.Condition()
        self._running: dict[int, _Claim] = {}  # analysis id -> its claim, while it runs
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.threads):
            thread = threading.Thread(target=self._loop, name=f"raiox-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, grace_s: float = 20.0) -> list[int]:
        """Stop claiming, let running jobs finish for grace_s, give the rest back."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            leftover = list(self._running.values())
        released = []
        if leftover:
            with self._connect() as conn:
                for claim in leftover:
                    if queries.release_job(conn, claim.analysis_id, claim.attempt):
                        released.append(claim.analysis_id)
                        logs.event("job released", analysis_id=claim.public_id)
                conn.commit()
        return released

    def wait(self, analysis_id: int, timeout_s: float, is_final: Callable[[], bool]) -> bool:
        """Block until the analysis ended (here or in another process) or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if is_final():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._finished:
                self._finished.wait(min(left, 0.5))  # 0.5 s: jobs other servers finish

    # --- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                worked = self.run_jobs(conn)
                if not worked and self.notifiers:
                    worked = self.send_one_notification(conn)
            except Exception as exc:  # the thread must outlive any one failure
                logs.event("worker error", logging.WARNING, error=str(exc)[:200], exc_info=True)
                if conn is not None:
                    conn.close()
                conn = None
                worked = False
                self._stopping.wait(self.poll_s)
            if not worked:
                self._wake.wait(self.poll_s)
                self._wake.clear()
        if conn is not None:
            conn.close()

    def run_one_job(self, conn: psycopg.Connection) -> bool:
        """Claim and run one due job; False when none was due."""
        return self.run_jobs(conn, limit=1)

    def run_jobs(self, conn: psycopg.Connection, limit: int | None = None) -> bool:
        """Claim up to `limit` (default: `batch`) due jobs, waiting BATCH_WAIT_S for
        more when fewer are due, embed every orientation of all of them in one forward
        pass, ask the database about all their vectors at once, then finish each job in
        its own transaction. Results, notifications, leases and retries stay per job."""
        lease, limit = self.settings.job_lease_s, limit or self.batch
        jobs = queries.claim_due_jobs(conn, lease_s=lease, limit=limit)
        conn.commit()
        if not jobs:
            return False
        if len(jobs) < limit and not self._stopping.wait(BATCH_WAIT_S):
            jobs += queries.claim_due_jobs(conn, lease_s=lease, limit=limit - len(jobs))
            conn.commit()
        claims = [_Claim(job["id"], job["attempts"], str(job["public_id"])) for job in jobs]
        with self._lock:
            self._running.update((claim.analysis_id, claim) for claim in claims)
        started = time.monotonic()
        statuses: dict[int, str] = {}
        try:
            loaded = {}
            for job, claim in zip(jobs, claims, strict=True):
                logs.event("job started", analysis_id=claim.public_id, attempt=claim.attempt)
                try:
                    if claim.attempt > self.settings.job_max_attempts:
                        raise JobFailed(
                            f"gave up after {claim.attempt - 1} attempts "
                            "(the last one never finished)",
                            transient=False,
                        )
                    loaded[claim.analysis_id] = self._load(conn, job, claim)
                except Exception as exc:
                    conn.rollback()
                    statuses[claim.analysis_id] = self._record_failure(conn, claim, _classify(exc))
            ready = [claim for claim in claims if claim.analysis_id in loaded]
            try:
                results = self._search_many([loaded[c.analysis_id] for c in ready], conn)
            except Exception as exc:  # the catalogue or the database: every job of the batch
                conn.rollback()
                failure = _classify(exc)
                for claim in ready:
                    statuses[claim.analysis_id] = self._record_failure(conn, claim, failure)
                ready, results = [], []
            for claim, result in zip(ready, results, strict=True):
                try:
                    self._finish(conn, claim, result)
                    statuses[claim.analysis_id] = "done"
                except Exception as exc:
                    conn.rollback()
                    statuses[claim.analysis_id] = self._record_failure(conn, claim, _classify(exc))
        finally:
            with self._lock:
                for claim in claims:
                    self._running.pop(claim.analysis_id, None)
        with self._finished:
            self._finished.notify_all()
        ms = round((time.monotonic() - started) * 1000)
        for claim in claims:
            status = statuses.get(claim.analysis_id, "failed")
            self.metrics.job_ended(status, claim.attempt, started)
            logs.event(
                "job " + status,
                analysis_id=claim.public_id,
                attempt=claim.attempt,
                ms=ms,
                batch=len(claims),
            )
        return True

    def _search_many(
        self, pictures: list[images.LoadedImage], conn: psycopg.Connection
    ) -> list[search.SearchResult]:
        """Every orientation of every picture through the model in one batch, then
        the database in one statement per round (search.search_many_vectors)."""
        if not pictures:
            return []
        model = search.catalogue_model(conn, self.embedder.model_id)
        views = search.ORIENTATIONS if self.settings.tta else search.ORIENTATIONS[:1]
        preprocess = self.embedder.preprocessor
        rows = [
            {"pixels": pipeline.views_of(loaded.image, preprocess, views)} for loaded in pictures
        ]
        pipeline.embed(rows, self.embedder)
        results = search.search_many_vectors(
            conn,
            model,
            [row["vectors"] for row in rows],
            [views] * len(rows),
            k=TOP_K,
            ef_search=self.settings.ef_search,
            min_score=self.settings.min_score,
            min_margin=self.settings.min_margin,
        )
        return [
            replace(result, crop_box=loaded.crop_box)
            for result, loaded in zip(results, pictures, strict=True)
        ]

    def _load(
        self, conn: psycopg.Connection, job: dict[str, Any], claim: _Claim
    ) -> images.LoadedImage:
        """The job's X-ray: from the store, or downloaded (and stored) the first time."""
        limits: dict[str, Any] = {
            "max_pixels": self.settings.max_pixels,
            "max_bytes": self.policy.max_bytes,
            "crop": images.Crop(*job["crop"]) if job.get("crop") else None,
        }
        if job["storage_key"]:
            loaded = images.load_image(self.store.get(job["storage_key"]), **limits)
        else:
            try:
                fetched = download.download(job["image_url"], self.policy)
            except download.DownloadError as exc:  # counted here: both job paths load here
                self.metrics.download_failures.labels(exc.reason).inc()
                raise
            loaded = images.load_image(fetched.data, **limits)
            # The embedding below comes from these pixels; only a de-identified copy is
            # stored (privacy.py), and it decodes to the same pixels for a retry.
            key = privacy.store_image(self.store, fetched.data, loaded.format, self.settings)
            recorded = queries.record_analysis_image(
                conn, claim.analysis_id, sha256=loaded.sha256, storage_key=key
            )
            conn.commit()  # a retry reads the stored copy instead of downloading again
            if not recorded:
                # Deleted while downloading. The object is not removed here: another
                # row may be naming the same content-addressed object right now; the
                # orphan sweep (store/orphans.py) removes it after its grace period.
                raise JobFailed(
                    "the analysis was deleted while its image downloaded", transient=False
                )
        return loaded

    def _finish(self, conn: psycopg.Connection, claim: _Claim, result: search.SearchResult) -> None:
        if not queries.lock_claimed_job(conn, claim.analysis_id, claim.attempt):
            conn.rollback()
            raise JobFailed("lease lost to another worker", transient=True)
        analyses.record_result(conn, claim.analysis_id, result, self.channels)
        conn.commit()

    def _record_failure(self, conn: psycopg.Connection, claim: _Claim, error: JobFailed) -> str:
        message = str(error)[:1000]
        if error.transient and claim.attempt < self.settings.job_max_attempts:
            delay = backoff_s(claim.attempt, self.settings.job_retry_base_s)
            queries.retry_job(conn, claim.analysis_id, claim.attempt, error=message, delay_s=delay)
            conn.commit()
            logs.event(
                "job will retry",
                logging.WARNING,
                analysis_id=claim.public_id,
                attempt=claim.attempt,
                delay_s=delay,
                error=message,
            )
            return "retrying"
        analyses.record_failure(
            conn,
            claim.analysis_id,
            claim.attempt,
            error=message,
            kind=error.kind,
            channels=self.channels,
        )
        conn.commit()
        logs.event("job error", logging.WARNING, analysis_id=claim.public_id, error=message)
        return "failed"

    def send_one_notification(self, conn: psycopg.Connection) -> bool:
        due = queries.claim_next_notification(
            conn, channels=list(self.notifiers), lease_s=NOTIFY_LEASE_S
        )
        conn.commit()
        if due is None:
            return False
        analysis_id, channel, attempt = due["analysis_id"], due["channel"], due["attempts"]
        public_id = str(due["public_id"])
        try:
            finished = self._finished_analysis(conn, analysis_id)
            conn.commit()
            self.notifiers[channel].deliver(finished, due["recipient"])
        except notify.NotifyFailed as exc:
            if exc.transient and attempt < NOTIFY_MAX_ATTEMPTS:
                delay = backoff_s(attempt, self.settings.job_retry_base_s)
                queries.notification_retry(
                    conn, analysis_id, channel, error=str(exc), delay_s=delay
                )
                self.metrics.notifications.labels(channel, "retry").inc()
            else:
                queries.notification_failed(conn, analysis_id, channel, error=str(exc))
                self.metrics.notifications.labels(channel, "failed").inc()
            conn.commit()
            logs.event(
                "notify error",
                logging.WARNING,
                analysis_id=public_id,
                channel=channel,
                attempt=attempt,
                error=str(exc),
            )
            return True
        queries.notification_sent(conn, analysis_id, channel)
        conn.commit()
        self.metrics.notifications.labels(channel, "sent").inc()
        logs.event("notify sent", analysis_id=public_id, channel=channel, attempt=attempt)
        return True

    def _finished_analysis(self, conn: psycopg.Connection, analysis_id: int) -> notify.Finished:
        view = results.analysis(conn, self.links, analysis_id)
        if view is None:  # deleted since it was queued
            raise notify.NotifyFailed("the analysis no longer exists", transient=False)
        if view["status"] == "done" and view.get("trust"):
            view["confidence"] = view["trust"]["verdict"]  # as the answer said it
        elif view["status"] == "done":  # analysed before answers carried their trust
            view["confidence"] = search.confidence(
                [float(m["score"]) for m in view["matches"]],
                self.settings.min_score,
                self.settings.min_margin,
            )
        lang = i18n.preferred(view.get("lang"), self.settings.default_lang)
        link = links.result_link(self.settings, uuid.UUID(view["id"]))
        view["result_url"] = link[0] if link else None
        row = queries.get_analysis(conn, analysis_id)
        zone = (row or {}).get("clinic_timezone") or self.settings.timezone
        return notify.Finished(view, lang, link[1] if link else None, zone)
