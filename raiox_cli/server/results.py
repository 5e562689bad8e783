"""What the API answers: analyses and implants as JSON-ready dicts, with
short-lived links instead of public object URLs, and contact sheets.

Links to stored images are an S3 store's presigned URLs; a local store's objects
are served by the server itself under a signed, expiring path (`/v1/images/<token>`,
routes/api.py), never as the server's `file://` paths."""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from PIL import Image

from raiox_cli import images
from raiox_cli.clinics import feedback, links
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.search import sheet
from raiox_cli.search.result import Trust
from raiox_cli.server import logs
from raiox_cli.store.objects import KEY, Store

IMAGES_PATH = "/v1/images/"


@dataclass(frozen=True)
class Links:
    """How an answer links what it shows: stored images and the result page."""

    store: Store
    settings: Settings
    base: str | None  # the server's address, without /v1; None: no address to link to

    @classmethod
    def for_worker(cls, store: Store, settings: Settings) -> Links:
        """Outside a request (notifications): the address people use, if configured."""
        return cls(store, settings, (settings.public_url or "").rstrip("/") or None)

    def image(self, key: str | None) -> str | None:
        if not key:
            return None
        expires_s = self.settings.link_expires_s
        try:
            url = self.store.url(key, expires_s=expires_s)
        except Exception as exc:  # a missing object must not break the whole answer
            logs.event("link failed", logging.WARNING, key=key, error=type(exc).__name__)
            return None
        if url.startswith(("https://", "http://")):
            return url  # presigned by the store itself
        match = KEY.match(key)
        if self.base is None or match is None:
            return None  # a server path would mean nothing to the client: no link at all
        token = links.sign_image(
            links.image_key(self.settings), key.rsplit("/", 1)[-1], int(time.time() + expires_s)
        )
        return f"{self.base}{IMAGES_PATH}{token}"

    def result(self, public_id: uuid.UUID | str) -> str | None:
        """The dentist's result page, when RAIOX_PUBLIC_URL says where people reach it."""
        found = links.result_link(self.settings, uuid.UUID(str(public_id)))
        return found[0] if found else None


def analysis(conn: psycopg.Connection, to: Links, analysis_id: int) -> dict[str, Any] | None:
    """By internal id, unscoped: for the worker and for a request's own new analysis."""
    row = queries.get_analysis(conn, analysis_id)
    return None if row is None else view_of(conn, to, row)


def analysis_for(
    conn: psycopg.Connection, to: Links, public_id: uuid.UUID, clinic_id: int | None
) -> dict[str, Any] | None:
    """By public id, as the caller may see it (clinic_id None: the operator)."""
    row = queries.find_analysis(conn, public_id, clinic_id=clinic_id)
    return None if row is None else view_of(conn, to, row)


def view_of(conn: psycopg.Connection, to: Links, row: dict[str, Any]) -> dict[str, Any]:
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
        "error_kind": row["error_kind"],
        "lang": row["lang"],
        "crop": row["crop"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "result_url": to.result(row["public_id"]),
        "image": {
            "sha256": row["image_sha256"],
            "url": to.image(row["storage_key"]),
        },
        "matches": [
            {
                "rank": m["rank"],
                "implant_id": m["implant_id"],
                "key": m["implant_key"],
                "name": m["name"],
                "manufacturer": m["manufacturer"],
                "system": m["system"],
                "diameter_mm": m["diameter_mm"],
                "length_mm": m["length_mm"],
                "connection": m["connection"],
                "score": m["score"],
                "image_id": m["image_id"],
                "image_url": to.image(m["storage_key"]),
            }
            for m in matches
        ],
    }
    trust = Trust.from_dict(row.get("trust"))  # as the answer carried it, never recomputed
    view["trust"] = trust.to_dict() if trust else None
    confirmed = feedback.latest(conn, analysis_id)
    view["confirmation"] = confirmed.to_dict() if confirmed else None
    notifications = queries.notifications_of(conn, analysis_id)
    if notifications:
        view["notifications"] = {
            n["channel"]: {"status": n["status"], "attempts": n["attempts"], "error": n["error"]}
            for n in notifications
        }
    return view


def trust_words(t: Any, trust: dict[str, Any] | None, names: dict[str, str]) -> dict[str, Any]:
    """The answer's trust fields in the reader's language (result page and e-mail):
    calibrated probability, "one of these N", "probably not in our catalogue"; or
    that it is uncalibrated. `names`: implant key -> name for the set."""
    if not trust:
        return {"calibrated": False, "lines": []}
    if not trust["calibrated"]:
        return {"calibrated": False, "lines": [t("trust.uncalibrated")]}
    coverage = round(100 * trust["set_coverage"])
    members = [names.get(key, key) for key in trust["prediction_set"]]
    lines = [t("trust.probability", percent=round(100 * trust["probability"]))]
    if members:
        lines.append(t("trust.set", coverage=coverage, n=len(members), names="; ".join(members)))
    else:
        lines.append(t("trust.set_empty", coverage=coverage))
    if trust["out_of_catalogue"]:
        lines.append(t("trust.not_in_catalogue"))
    return {"calibrated": True, "lines": lines, "set": trust["prediction_set"]}


def implant(conn: psycopg.Connection, to: Links, implant_id: int) -> dict[str, Any] | None:
    row = queries.get_implant(conn, implant_id)
    if row is None:
        return None
    pictures = queries.implant_images_of(conn, implant_id)
    for picture in pictures:
        picture["url"] = to.image(picture.pop("storage_key"))
    return {**row, "images": pictures}


def sheet_png(conn: psycopg.Connection, store: Any, row: dict[str, Any], lang: str) -> bytes:
    """The CLI's contact sheet of a finished analysis, as PNG bytes: the query (crop
    box in red) beside the matches' reference images, read from the image store, its
    words in `lang`."""

    def picture(key: str | None) -> Image.Image | None:
        if not key:
            return None
        try:
            return images.load_image(store.get(key)).image
        except Exception as exc:  # a missing picture must not lose the sheet
            logs.event("sheet image unavailable", key=key, error=type(exc).__name__)
            return None

    words = sheet.words(lang)
    matches = queries.analysis_matches(conn, row["id"])
    trust = Trust.from_dict(row.get("trust"))  # as the answer carried it
    tiles = [
        sheet.Tile(
            picture(m["storage_key"]),
            (
                f"#{m['rank']} {m['name'] or m['implant_key']}",
                (m["manufacturer"] or "") + (f" · {m['system']}" if m["system"] else ""),
                sheet.score_caption(lang, float(m["score"])),
            ),
            sheet.accent(trust, m["implant_key"]),
        )
        for m in matches
    ]
    crop = tuple(row["crop"]) if row.get("crop") else None
    analysis = words["analysis"].format(id=row["public_id"])
    query = sheet.Tile(picture(row["storage_key"]), (words["query"], analysis, ""))
    top = (matches[0]["name"] or matches[0]["implant_key"]) if matches else None
    title = f"{analysis}: {sheet.verdict_title(trust, top, lang)}"
    rendered = sheet.render(query, tiles, title=title, crop_box=crop, lang=lang)
    out = io.BytesIO()
    rendered.save(out, format="PNG")
    return out.getvalue()
