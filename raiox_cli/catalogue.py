"""Scan a catalogue folder (and its optional catalogue.csv) into implant records."""

from __future__ import annotations

import csv
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raiox_cli.errors import UsageError

_SPACES = re.compile(r"\s+")


def _norm(part: str | None) -> str:
    text = unicodedata.normalize("NFKC", part or "").casefold()
    # "/" separates the key's parts, so it may not appear inside one.
    return _SPACES.sub(" ", text.replace("/", "-")).strip()


def implant_key(manufacturer: str, system: str | None, name: str) -> str:
    """The stable key of an implant: `manufacturer/system/name`, each part
    NFKC-normalised, case-folded and whitespace-collapsed, so re-ingesting (or a
    renamed folder that differs only in case or spacing) never duplicates it."""
    return f"{_norm(manufacturer)}/{_norm(system)}/{_norm(name)}"


# --- scanning ---------------------------------------------------------------------

CSV_NAME = "catalogue.csv"
KNOWN_COLUMNS = (
    "path",
    "name",
    "manufacturer",
    "system",
    "diameter_mm",
    "length_mm",
    "connection",
    "notes",
)
NUMERIC_COLUMNS = ("diameter_mm", "length_mm")
# Image files by name; their content is checked when decoded (images.py). Files
# with no suffix are included because DICOM exports often have none.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom", ""}
)


class CatalogueError(UsageError):
    """The catalogue folder itself cannot be used."""


@dataclass(frozen=True)
class ImplantRecord:
    key: str
    name: str
    manufacturer: str
    system: str | None = None
    diameter_mm: float | None = None
    length_mm: float | None = None
    connection: str | None = None
    notes: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "manufacturer": self.manufacturer,
            "system": self.system,
            "diameter_mm": self.diameter_mm,
            "length_mm": self.length_mm,
            "connection": self.connection,
            "notes": self.notes,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class CatalogueFile:
    path: Path  # absolute
    rel: str  # relative to the root, "/"-separated: what the database records
    size: int
    mtime_ns: int
    implant: ImplantRecord


@dataclass(frozen=True)
class Problem:
    """One line about one file (and row of catalogue.csv); the scan goes on."""

    file: str
    message: str
    row: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.row}" if self.row is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class Scan:
    root: Path
    files: list[CatalogueFile]
    problems: list[Problem]

    @property
    def implants(self) -> dict[str, ImplantRecord]:
        return {f.implant.key: f.implant for f in self.files}


@dataclass
class _Row:
    number: int
    values: dict[str, str]
    extra: dict[str, str]
    used: bool = False


def scan(root: Path) -> Scan:
    """Every image under `root/<Manufacturer>/<Implant name>/` (any depth below the
    implant folder), with its implant's metadata: folder names, overridden by
    `root/catalogue.csv` rows. Problems are collected, never raised, except for a
    root that is not a readable folder."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogueError(f"{root} is not a folder; give the catalogue's root folder")
    problems: list[Problem] = []
    folder_rows, file_rows = _read_csv(root / CSV_NAME, problems)
    files: list[CatalogueFile] = []
    for path in _image_files(root, problems):
        rel_parts = path.relative_to(root).parts
        if len(rel_parts) < 3:
            continue  # files beside the manufacturer folders are not images of an implant
        rel = "/".join(rel_parts)
        folder = "/".join(rel_parts[:2])
        row = file_rows.get(rel) or folder_rows.get(folder)
        if row is not None:
            row.used = True
        try:
            stat = path.stat()
        except OSError as exc:
            problems.append(Problem(rel, f"cannot read ({exc.strerror or exc})"))
            continue
        implant = _implant(rel_parts[0], rel_parts[1], row)
        files.append(CatalogueFile(path, rel, stat.st_size, stat.st_mtime_ns, implant))
    for rows in (folder_rows, file_rows):
        for target, row in rows.items():
            if not row.used:
                problems.append(
                    Problem(CSV_NAME, f"path {target!r} matches no image in {root}", row.number)
                )
    return Scan(root, files, problems)


def _image_files(root: Path, problems: list[Problem]) -> list[Path]:
    found = []

    def onerror(exc: OSError) -> None:
        problems.append(Problem(str(exc.filename), f"cannot list ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            found.append(Path(dirpath) / name)
    return found


def _implant(manufacturer_dir: str, implant_dir: str, row: _Row | None) -> ImplantRecord:
    values = row.values if row else {}
    manufacturer = values.get("manufacturer") or manufacturer_dir
    name = values.get("name") or implant_dir
    system = values.get("system") or None
    numbers = {c: float(values[c]) if values.get(c) else None for c in NUMERIC_COLUMNS}
    return ImplantRecord(
        key=implant_key(manufacturer, system, name),
        name=name,
        manufacturer=manufacturer,
        system=system,
        connection=values.get("connection") or None,
        notes=values.get("notes") or None,
        extra=dict(row.extra) if row else {},
        **numbers,
    )


def _read_csv(path: Path, problems: list[Problem]) -> tuple[dict[str, _Row], dict[str, _Row]]:
    """catalogue.csv -> rows by implant folder and rows by image path."""
    folder_rows: dict[str, _Row] = {}
    file_rows: dict[str, _Row] = {}
    if not path.is_file():
        return folder_rows, file_rows
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip().lower() for h in reader.fieldnames or []]
            if "path" not in header and not {"name", "manufacturer"} <= set(header):
                problems.append(
                    Problem(
                        CSV_NAME,
                        "needs a header row with a path column, or name and manufacturer "
                        "columns; the file is ignored",
                        1,
                    )
                )
                return folder_rows, file_rows
            reader.fieldnames = header
            for record in reader:
                row = _parse_row(record, reader.line_num, problems)
                if row is None:
                    continue
                target = row.values.get("path") or (
                    f"{row.values['manufacturer']}/{row.values['name']}"
                )
                target = target.strip("/")
                table = folder_rows if target.count("/") == 1 else file_rows
                if target in table:
                    problems.append(
                        Problem(
                            CSV_NAME,
                            f"duplicate entry for {target!r} (first on row "
                            f"{table[target].number}); this row is ignored",
                            row.number,
                        )
                    )
                    continue
                table[target] = row
    except UnicodeDecodeError as exc:
        problems.append(Problem(CSV_NAME, f"not UTF-8 ({exc.reason}); the file is ignored"))
    except (OSError, csv.Error) as exc:
        problems.append(Problem(CSV_NAME, f"cannot read: {exc}; the file is ignored"))
    return folder_rows, file_rows


def _parse_row(record: dict[Any, Any], number: int, problems: list[Problem]) -> _Row | None:
    if None in record:  # more cells than header columns
        problems.append(Problem(CSV_NAME, "more cells than header columns", number))
        record.pop(None)
    values = {k: (v or "").strip() for k, v in record.items()}
    if not any(values.values()):
        return None  # blank line
    path = values.get("path", "").replace("\\", "/")
    if path:
        if path.startswith("/") or ".." in path.split("/") or path.count("/") < 1:
            problems.append(
                Problem(
                    CSV_NAME,
                    f"path {path!r} must be Manufacturer/Implant or a file below it, "
                    "relative to the catalogue root; row ignored",
                    number,
                )
            )
            return None
        values["path"] = path
    elif not (values.get("manufacturer") and values.get("name")):
        problems.append(
            Problem(CSV_NAME, "needs a path, or both manufacturer and name; row ignored", number)
        )
        return None
    for column in NUMERIC_COLUMNS:
        raw = values.get(column, "")
        if not raw:
            continue
        try:
            number_ = float(raw.replace(",", "."))
        except ValueError:
            number_ = float("nan")
        if not math.isfinite(number_) or number_ <= 0:
            problems.append(
                Problem(CSV_NAME, f"{column} {raw!r} is not a positive number; left empty", number)
            )
            values[column] = ""
        else:
            values[column] = str(number_)
    extra = {k: v for k, v in values.items() if k not in KNOWN_COLUMNS and k and v}
    known = {k: v for k, v in values.items() if k in KNOWN_COLUMNS}
    return _Row(number, known, extra)
