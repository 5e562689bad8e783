"""Confirmations: the dentist says which implant an analysis really shows (any
implant of the catalogue, or "not in the catalogue"), and the labelled X-rays
that come out of them.

`confirm()` is the one way a confirmation is recorded: the CLI (`raiox confirm`),
the API (`POST /analyses/{id}/feedback`) and the result pages all call it. It runs
in the caller's transaction (commit after) and never imports a web framework.
A confirmation only ever adds a row: changing one's answer keeps the history and
the latest answer wins everywhere (eval --confirmed, export-labels, adapt).
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from raiox_cli import db, utc
from raiox_cli.catalogue import implants
from raiox_cli.catalogue.implants import UnknownImplant as UnknownImplant  # callers catch it here
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.images import sniff_format
from raiox_cli.store import objects as storage

MAX_NOTE = 2000  # characters; the table's CHECKs hold the same bounds
MAX_CLIENT_ID = 200
MAX_KEY = 300
NOT_IN_CATALOGUE_DIR = "not-in-catalogue"
LABELS_CSV = "labels.csv"
NOT_IN_CATALOGUE_CSV = "not-in-catalogue.csv"


class UnknownAnalysis(RaioxError):
    """No analysis has this id, or none the calling clinic may see (the same answer,
    so ids of other clinics cannot be probed)."""


class AnalysisNotDone(RaioxError):
    """The analysis has no answer yet (pending) or none at all (failed)."""


class BadConfirmation(UsageError):
    """The confirmation's fields are out of bounds or contradict each other."""


@dataclass(frozen=True)
class Confirmation:
    """One confirmation, as the CLI's --json and the API answer it."""

    id: int
    analysis_id: str  # the analysis's public id (a UUID), as every URL and answer
    not_in_catalogue: bool
    implant: dict[str, Any] | None  # id, key, name, manufacturer, system; None: not in catalogue
    raiox_rank: int | None  # where raiox ranked the confirmed implant; None: not listed
    note: str | None
    client_id: str | None  # who confirmed
    confirmed_at: datetime
    previous: dict[str, Any] | None = None  # the answer this one replaces, if any

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["confirmed_at"] = utc.iso(self.confirmed_at)
        return data


def _bounded(value: str | None, name: str, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if len(value) > limit:
        raise BadConfirmation(f"{name} is {len(value)} characters long; at most {limit}")
    if "\x00" in value:  # PostgreSQL cannot store it in text
        raise BadConfirmation(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadConfirmation(f"{name} is not valid Unicode (lone surrogate)") from None
    return value or None


def find_implant(conn: psycopg.Connection, text: str) -> dict[str, Any]:
    """The catalogue implant a key names (UnknownImplant, with suggestions, if none)."""
    return implants.find(conn, text)


def _implant(row: dict[str, Any]) -> dict[str, Any] | None:
    if row["not_in_catalogue"]:
        return None
    return {
        "id": row["implant_id"],
        "key": row["implant_key"],
        "name": row["name"],
        "manufacturer": row["manufacturer"],
        "system": row["system"],
    }


def _confirmation(row: dict[str, Any], ranked: list[str], previous: Any = None) -> Confirmation:
    key = row["implant_key"]
    return Confirmation(
        id=row["id"],
        analysis_id=str(row["public_id"]),
        not_in_catalogue=row["not_in_catalogue"],
        implant=_implant(row),
        raiox_rank=ranked.index(key) + 1 if key in ranked else None,
        note=row["note"],
        client_id=row["client_id"],
        confirmed_at=row["created_at"],
        previous=previous,
    )


def find_analysis(
    conn: psycopg.Connection, analysis: uuid.UUID | int | str, *, clinic_id: int | None = None
) -> dict[str, Any]:
    """An analysis by its public id (a UUID) or, for the operator's CLI, its internal
    number (`raiox search --save` prints it), as the caller may see it: any for the
    operator (clinic_id None), else only that clinic's own."""
    if isinstance(analysis, str):
        text = analysis.strip()
        try:
            analysis = int(text) if text.isdigit() else uuid.UUID(text)
        except ValueError:
            raise UnknownAnalysis(f"no analysis {text!r}: not an analysis id") from None
    if isinstance(analysis, uuid.UUID):
        row = queries.find_analysis(conn, analysis, clinic_id=clinic_id)
    else:
        row = queries.get_analysis(conn, analysis)
        if row is not None and clinic_id is not None and row["clinic_id"] != clinic_id:
            row = None
    if row is None:
        raise UnknownAnalysis(f"no analysis {analysis}")
    return row


def confirm(
    conn: psycopg.Connection,
    analysis: uuid.UUID | int | str,
    implant_key: str | None,
    *,
    note: str | None = None,
    client_id: str | None = None,
    clinic_id: int | None = None,
) -> Confirmation:
    """Record that `analysis` (public UUID, or internal number) shows the implant
    `implant_key` (None: an implant that is not in the catalogue), confirmed by
    `client_id`. With `clinic_id`, only that clinic's analyses can be confirmed
    (another clinic's is UnknownAnalysis, like a missing one). Raises
    UnknownAnalysis, AnalysisNotDone, UnknownImplant or BadConfirmation; commits
    nothing. Its answer: Confirmation.to_dict() (docs/guides/clinics.md: Confirmations)."""
    note = _bounded(note, "note", MAX_NOTE)
    client_id = _bounded(client_id, "client id", MAX_CLIENT_ID)
    key = _bounded(implant_key, "implant key", MAX_KEY)
    if implant_key is not None and key is None:
        raise BadConfirmation("the implant key is empty; give one, or say not in the catalogue")
    row = find_analysis(conn, analysis, clinic_id=clinic_id)
    analysis_id = row["id"]
    if row["status"] != "done":
        why = (
            f"it failed ({row['error']}); there is no answer to confirm"
            if row["status"] == "failed"
            else f"it is still {row['status']}; confirm it once its result is in"
        )
        raise AnalysisNotDone(f"analysis {analysis} cannot be confirmed: {why}")
    implant = find_implant(conn, key) if key is not None else None
    history = queries.confirmation_history(conn, analysis_id)
    added = queries.add_confirmation(
        conn,
        analysis_id,
        implant_id=implant["id"] if implant else None,
        implant_key=implant["key"] if implant else None,
        note=note,
        client_id=client_id,
    )
    confirmed = {
        **added,
        "public_id": row["public_id"],
        "not_in_catalogue": implant is None,
        "implant_id": implant["id"] if implant else None,
        "implant_key": implant["key"] if implant else None,
        "name": implant["name"] if implant else None,
        "manufacturer": implant["manufacturer"] if implant else None,
        "system": implant["system"] if implant else None,
        "note": note,
        "client_id": client_id,
    }
    ranked = [m["implant_key"] for m in queries.analysis_matches(conn, analysis_id)]
    previous = _confirmation(history[0], ranked).to_dict() if history else None
    return _confirmation(confirmed, ranked, previous)


def history(conn: psycopg.Connection, analysis_id: int) -> list[Confirmation]:
    """Every confirmation of an analysis, latest (the one that counts) first."""
    ranked = [m["implant_key"] for m in queries.analysis_matches(conn, analysis_id)]
    return [_confirmation(row, ranked) for row in queries.confirmation_history(conn, analysis_id)]


def latest(conn: psycopg.Connection, analysis_id: int) -> Confirmation | None:
    found = history(conn, analysis_id)
    return found[0] if found else None


def confirm_analysis(
    settings: Settings,
    analysis: str,
    implant_key: str | None,
    *,
    not_in_catalogue: bool = False,
    note: str | None = None,
    client_id: str | None = None,
) -> Confirmation:
    """`raiox confirm`: check the arguments, record, commit."""
    if (implant_key is None) == (not not_in_catalogue):
        raise BadConfirmation(
            "give the implant's key (raiox confirm ID KEY) or --not-in-catalogue, not both"
            if not_in_catalogue
            else "give the implant's key (raiox confirm ID KEY) or --not-in-catalogue"
        )
    with db.connect(settings) as conn:
        db.check_schema(conn)
        done = confirm(conn, analysis, implant_key, note=note, client_id=client_id)
        conn.commit()
    return done


# --- export-labels -------------------------------------------------------------------


@dataclass
class ExportReport:
    out: str
    exported: int = 0  # X-rays written under <Manufacturer>/<Implant name>/
    implants: int = 0  # distinct implants among them
    not_in_catalogue: int = 0  # X-rays written under not-in-catalogue/
    without_image: int = 0  # confirmed analyses whose X-ray was never stored
    failed: list[str] = field(default_factory=list)  # X-rays the store could not give

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _folder_name(text: str | None, fallback: str) -> str:
    """A path component from a catalogue name: no separators, no dot-names."""
    cleaned = "".join("-" if ch in '/\\:*?"<>|' or ord(ch) < 32 else ch for ch in text or "")
    cleaned = cleaned.strip().strip(".")
    return cleaned or fallback


def _suffix(data: bytes) -> str:
    fmt = sniff_format(data[:256]) or ""
    return {
        "JPEG": ".jpg",
        "PNG": ".png",
        "TIFF": ".tif",
        "BMP": ".bmp",
        "WEBP": ".webp",
        "DICOM": ".dcm",
    }.get(fmt, ".bin")


def _utc(since: datetime | None) -> datetime | None:
    if since is not None and since.tzinfo is None:
        return since.replace(tzinfo=timezone.utc)
    return since


def export_labels(
    conn: psycopg.Connection,
    get: Callable[[str], bytes],
    out: Path,
    *,
    since: datetime | None = None,
    client: str | None = None,
) -> ExportReport:
    """Write the confirmed X-rays (latest confirmation of each analysis) into `out`
    as `raiox eval` reads them: <Manufacturer>/<Implant name>/<analysis>-<sha>.<ext>
    plus labels.csv (path,expected_key,...). "Not in the catalogue" X-rays go to
    not-in-catalogue/ with their notes in not-in-catalogue.csv, where eval does not
    look. Unconfirmed analyses are never written. `get` reads a stored object."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; export into a new one")
    since = _utc(since)
    report = ExportReport(out=str(out))
    labelled = queries.confirmed_query_images(conn, since=since, client=client)
    unlabelled = {}
    for row in queries.latest_confirmations(conn, since=since, client=client):
        if row["storage_key"] is None:
            report.without_image += 1
        elif row["not_in_catalogue"]:
            unlabelled.setdefault(row["image_sha256"], row)  # the same X-ray once

    def write(folder: Path, row: dict[str, Any]) -> str | None:
        try:
            data = get(row["storage_key"])
        except RaioxError as exc:
            report.failed.append(f"analysis {row['public_id']}: {exc}")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{row['public_id']}{_suffix(data)}"
        path.write_bytes(data)
        return path.relative_to(out).as_posix()

    out.mkdir(parents=True, exist_ok=True)
    implants = set()
    with (out / LABELS_CSV).open("w", newline="", encoding="utf-8") as fh:
        labels = csv.writer(fh)
        labels.writerow(["path", "expected_key", "analysis_id", "image_sha256", "confirmed_at"])
        for row in labelled:
            manufacturer, _, name = row["implant_key"].split("/", 2)
            folder = out / _folder_name(row["manufacturer"], manufacturer)
            folder = folder / _folder_name(row["name"], name.split("/")[-1])
            path = write(folder, row)
            if path is not None:
                labels.writerow(
                    [path, row["implant_key"], row["public_id"], row["image_sha256"],
                     row["confirmed_at"].isoformat()]
                )  # fmt: skip
                report.exported += 1
                implants.add(row["implant_key"])
    report.implants = len(implants)
    with (out / NOT_IN_CATALOGUE_CSV).open("w", newline="", encoding="utf-8") as fh:
        others = csv.writer(fh)
        others.writerow(["path", "analysis_id", "image_sha256", "confirmed_at", "note"])
        for row in unlabelled.values():
            path = write(out / NOT_IN_CATALOGUE_DIR, row)
            if path is not None:
                others.writerow(
                    [path, row["public_id"], row["image_sha256"],
                     row["confirmed_at"].isoformat(), row["note"] or ""]
                )  # fmt: skip
                report.not_in_catalogue += 1
    return report


def export_labels_to(
    settings: Settings, out: Path, *, since: datetime | None = None, client: str | None = None
) -> ExportReport:
    """`raiox export-labels`: the configured database and image store."""
    store = storage.open_store(settings)
    with db.connect(settings) as conn:
        db.check_schema(conn)
        return export_labels(conn, store.get, out, since=since, client=client)
