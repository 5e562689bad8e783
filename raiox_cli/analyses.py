"""Accept an X-ray and analyse it: one path shared by the API (`POST /upload`, the
webhook's worker), the pages (the upload form) and the CLI (`raiox search --save`).

Every analysis that ends, done or failed, whichever way it came in, goes through
`finished`: the one place that queues the clinic's notifications.

    loaded = analyses.load_upload(settings, data)                 # ImageError: refuse
    analysis_id = analyses.accept_upload(conn, store, settings, data, loaded, clinic_id=1)
    conn.commit()                                                 # the worker takes it
    # or, answering at once:
    analysis_id, result = analyses.analyse_now(conn, embedder, store, settings, data, loaded)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from raiox_cli import db, embedding, images
from raiox_cli.clinics import privacy
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import Embedder
from raiox_cli.images import Crop, LoadedImage
from raiox_cli.search import query as search
from raiox_cli.search.result import SearchResult
from raiox_cli.store import objects as storage


@dataclass(frozen=True)
class Channels:
    """The notification channels the operator turned on (server/notify.py delivers
    them; `notify.notifiers` builds a deliverer for each under the same conditions)."""

    webhook: bool = False  # a signing secret: clinics' own URLs (clients add --notify-url)
    default_url: bool = False  # RAIOX_NOTIFY_URL: for analyses of clinics without one
    email: bool = False  # RAIOX_SMTP_URL

    @classmethod
    def of(cls, settings: Settings) -> Channels:
        return cls(
            webhook=bool(settings.notify_secret or settings.webhook_secret),
            default_url=bool(settings.notify_url),
            email=bool(settings.smtp_url),
        )


def finished(conn: psycopg.Connection, analysis_id: int, channels: Channels) -> None:
    """The analysis ended (done or failed): queue one delivery on every channel that
    has someone to tell. In the caller's transaction, so a result and its
    notifications are recorded together or not at all."""
    recipients: dict[str, str | None] = {}
    if channels.webhook:
        # The clinic's own URL before RAIOX_NOTIFY_URL: a clinic's results go to the
        # clinic, not to the operator.
        url = queries.notify_url_of_analysis(conn, analysis_id)
        if url or channels.default_url:
            recipients["webhook"] = url
    if channels.email:
        address = queries.email_recipient(conn, analysis_id)
        if address:
            recipients["email"] = address
    if recipients:
        queries.request_notifications(conn, analysis_id, recipients)


def record_result(
    conn: psycopg.Connection, analysis_id: int, result: SearchResult, channels: Channels
) -> None:
    """Store the ranked matches, mark the analysis done, then `finished`."""
    queries.finish_analysis(
        conn,
        analysis_id,
        model_id=result.model_id,
        matches=result.matches,
        trust=search.stored_trust(result),
    )
    finished(conn, analysis_id, channels)


def record_failure(
    conn: psycopg.Connection,
    analysis_id: int,
    attempt: int,
    *,
    error: str,
    kind: str,
    channels: Channels,
) -> bool:
    """Mark a running attempt failed for good, then `finished`; False when the
    attempt was no longer this worker's (nothing changed)."""
    failed = queries.fail_job(conn, analysis_id, attempt, error=error, error_kind=kind)
    if failed:
        finished(conn, analysis_id, channels)
    return failed


# --- an uploaded X-ray (the API's POST /upload and the upload page) ------------------


def load_upload(settings: Settings, data: bytes, crop: Crop | None = None) -> LoadedImage:
    """Decode an uploaded X-ray within the server's limits (images.ImageError if not)."""
    return images.load_image(
        data, max_pixels=settings.max_pixels, max_bytes=settings.server_max_bytes, crop=crop
    )


def accept_upload(
    conn: psycopg.Connection,
    store: Any,
    settings: Settings,
    data: bytes,
    loaded: LoadedImage,
    *,
    clinic_id: int | None,
    client_id: str | None = None,
    lang: str | None = None,
    status: str = "pending",
) -> int:
    """Store the de-identified X-ray (privacy.py: it decodes to the same pixels) and
    record its analysis; pending, a worker's job, unless the caller runs it now."""
    key = privacy.store_image(store, data, loaded.format, settings)
    analysis_id, _ = queries.create_analysis(
        conn,
        source="upload",
        clinic_id=clinic_id,
        client_id=client_id,
        image_sha256=loaded.sha256,
        storage_key=key,
        status=status,
        lang=lang,
        crop=loaded.crop_box,
    )
    return analysis_id


def analyse_now(
    conn: psycopg.Connection,
    embedder: Embedder,
    store: Any,
    settings: Settings,
    data: bytes,
    loaded: LoadedImage,
    *,
    clinic_id: int | None,
    k: int,
) -> tuple[int, SearchResult]:
    """Accept an upload and answer it in this request (POST /upload), committed."""
    search.catalogue_model(conn, embedder.model_id)
    analysis_id = accept_upload(
        conn, store, settings, data, loaded, clinic_id=clinic_id, status="running"
    )
    result = search.search_image(
        conn,
        embedder,
        loaded,
        k=k,
        ef_search=settings.ef_search,
        min_score=settings.min_score,
        min_margin=settings.min_margin,
        tta=settings.tta,
    )
    record_result(conn, analysis_id, result, Channels.of(settings))
    conn.commit()
    return analysis_id, result


# --- the CLI: `raiox search FILE [--save]` and the batch's --save ---------------------


def save_search(
    conn: psycopg.Connection,
    result: SearchResult,
    image_sha256: str,
    *,
    query_path: str,
    client_id: str | None = None,
    storage_key: str | None = None,
    channels: Channels | None = None,
) -> int:
    """Record a CLI search as a finished analysis with its ranked matches; the
    channels configured in this environment are queued (a running server's notifier
    delivers them), as for every other path."""
    analysis_id, _ = queries.create_analysis(
        conn,
        source="cli",
        client_id=client_id,
        image_sha256=image_sha256,
        storage_key=storage_key,
        metadata={
            "path": query_path,
            "crop": list(result.crop_box) if result.crop_box else None,
            "orientations": list(result.orientations),
            "confident": result.confident,
        },
        status="running",
        crop=result.crop_box,
    )
    record_result(conn, analysis_id, result, channels or Channels())
    return analysis_id


def search_file(
    settings: Settings,
    path: Path,
    *,
    k: int = 3,
    crop: Crop | None = None,
    manufacturer: str | None = None,
    save: bool = False,
    client_id: str | None = None,
    sheet_path: Path | None = None,
) -> SearchResult:
    """`raiox search`: decode, refuse what cannot be answered before loading the
    model, search, then optionally record the analysis and draw a contact sheet."""
    spec = embedding.ModelSpec.from_settings(settings)
    embedding.preload(spec)  # overlaps the model's load with decoding and the database
    data = search.read_query(path, settings)  # read once: decoded, stored, drawn
    loaded = search.load_query(path, settings, crop, data=data)
    with db.connect(settings) as conn:
        db.check_schema(conn)
        search.catalogue_model(conn, embedding.model_id(spec))
        result = search.search_image(
            conn,
            embedding.load_embedder(spec),
            loaded,
            k=k,
            manufacturer=manufacturer,
            ef_search=settings.ef_search,
            min_score=settings.min_score,
            tta=settings.tta,
            min_margin=settings.min_margin,
        )
        if save:
            # Kept with the analysis, de-identified, as the server does for uploads.
            key = privacy.store_image(storage.open_store(settings), data, loaded.format, settings)
            analysis_id = save_search(
                conn,
                result,
                loaded.sha256,
                query_path=str(path),
                client_id=client_id,
                storage_key=key,
                channels=Channels.of(settings),
            )
            result = replace(result, analysis_id=analysis_id)
    if sheet_path is not None:
        search.write_contact_sheet(settings, path, data, result, sheet_path)
    return result
