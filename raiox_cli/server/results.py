"""What the API answers: analyses and implants as JSON-ready dicts, with
short-lived presigned links instead of public object URLs."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Protocol

import psycopg

from raiox_cli import feedback, queries
from raiox_cli.server import logs


class LinkStore(Protocol):
    def url(self, key: str, expires_s: int = 3600) -> str: ...


def link(store: LinkStore, key: str | None, expires_s: int) -> str | None:
    if not key:
        return None
    try:
        return store.url(key, expires_s=expires_s)
    except Exception as exc:  # a missing object must not break the whole answer
        logs.event("link failed", logging.WARNING, key=key, error=type(exc).__name__)
        return None


def analysis(
    conn: psycopg.Connection, store: LinkStore, analysis_id: int, expires_s: int
) -> dict[str, Any] | None:
    """By internal id, unscoped: for the worker and for a request's own new analysis."""
    row = queries.get_analysis(conn, analysis_id)
    return None if row is None else view_of(conn, store, row, expires_s)


def analysis_for(
    conn: psycopg.Connection,
    store: LinkStore,
    public_id: uuid.UUID,
    clinic_id: int | None,
    expires_s: int,
) -> dict[str, Any] | None:
    """By public id, as the caller may see it (clinic_id None: the operator)."""
    row = queries.find_analysis(conn, public_id, clinic_id=clinic_id)
    return None if row is None else view_of(conn, store, row, expires_s)


def view_of(
    conn: psycopg.Connection, store: LinkStore, row: dict[str, Any], expires_s: int
) -> dict[str, Any]:
    """The answer for one analysis row: its public id, never the internal one."""
    analysis_id = row["id"]
    matches = queries.analysis_matches(conn, analysis_id) if row["status"] == "done" else []
    view: dict[str, Any] = {
        "id": str(row["public_id"]),
        "status": row["status"],
        "source": row["source"],
        "clinic": row["clinic"],
        "client_id": row["client_id"],
        "metadata": row["metadata"],
        "model_id": row["model_id"],
        "attempts": row["attempts"],
        "error": row["error"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "image": {
            "sha256": row["image_sha256"],
            "url": link(store, row["storage_key"], expires_s),
        },
        "matches": [
            {
                "rank": m["rank"],
                "implant_id": m["implant_id"],
                "key": m["implant_key"],
                "name": m["name"],
                "manufacturer": m["manufacturer"],
                "system": m["system"],
                "score": m["score"],
                "image_id": m["image_id"],
                "image_url": link(store, m["storage_key"], expires_s),
            }
            for m in matches
        ],
    }
    confirmed = feedback.latest(conn, analysis_id)
    view["confirmation"] = {**confirmed.to_dict(), "analysis_id": view["id"]} if confirmed else None
    if row["notify_status"]:
        view["notification"] = {
            "status": row["notify_status"],
            "attempts": row["notify_attempts"],
            "error": row["notify_error"],
        }
    return view


def implant(
    conn: psycopg.Connection, store: LinkStore, implant_id: int, expires_s: int
) -> dict[str, Any] | None:
    row = queries.get_implant(conn, implant_id)
    if row is None:
        return None
    images = queries.implant_images_of(conn, implant_id)
    for image in images:
        image["url"] = link(store, image.pop("storage_key"), expires_s)
    return {**row, "images": images}
