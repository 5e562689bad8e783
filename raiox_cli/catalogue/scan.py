"""Scan a catalogue folder (and its optional catalogue.csv) into implant records.

A catalogue root is a folder (local, or a share every machine mounts) or an
`s3://bucket/prefix` read through the storage settings (RAIOX_S3_ENDPOINT,
RAIOX_S3_REGION, AWS_* credentials), so every worker of a cluster can read it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raiox_cli import images
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.store.objects import Bucket, ObjectNotFound

if TYPE_CHECKING:
    from raiox_cli.config import Settings
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


# --- catalogue roots: a folder or a bucket prefix -----------------------------------

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class FolderRoot:
    """A catalogue in a folder (for a cluster: a share mounted at the same path)."""

    path: Path  # absolute

    def __str__(self) -> str:  # what the database records as the root
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def has(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def location(self, rel: str) -> str:
        return str(self.path / rel)

    def read(self, rel: str, max_bytes: int) -> bytes:
        return images.read_bytes(self.path / rel, max_bytes)

    def read_optional(self, name: str) -> bytes | None:
        path = self.path / name
        return path.read_bytes() if path.is_file() else None

    def walk(self, problems: list[Problem]) -> Iterator[tuple[str, int, int]]:
        """(relative path, size, mtime_ns) of every image file, folders sorted."""

        def onerror(exc: OSError) -> None:
            problems.append(Problem(str(exc.filename), f"cannot list ({exc.strerror or exc})"))

        for dirpath, dirnames, filenames in os.walk(self.path, onerror=onerror):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                path = Path(dirpath) / name
                rel = "/".join(path.relative_to(self.path).parts)
                try:
                    stat = path.stat()
                except OSError as exc:
                    problems.append(Problem(rel, f"cannot read ({exc.strerror or exc})"))
                    continue
                yield rel, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class BucketRoot:
    """A catalogue under `s3://bucket/prefix`: keys `prefix/<Manufacturer>/<Implant>/...`."""

    bucket: Bucket
    prefix: str  # no slash at either end; "" for the whole bucket

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket.name}/{self.prefix}".rstrip("/")

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def exists(self) -> bool:
        return next(iter(self.bucket.list(self._key(""))), None) is not None

    def has(self, rel: str) -> bool:
        return self.bucket.exists(self._key(rel))

    def location(self, rel: str) -> str:
        return f"{self}/{rel}"

    def read(self, rel: str, max_bytes: int) -> bytes:
        return self.bucket.read(self._key(rel), max_bytes)

    def read_optional(self, name: str) -> bytes | None:
        try:
            return self.bucket.read(self._key(name), 64 * 1024 * 1024)
        except ObjectNotFound:
            return None

    def walk(self, problems: list[Problem]) -> Iterator[tuple[str, int, int]]:
        start = len(self._key(""))
        for obj in self.bucket.list(self._key("")):
            rel = obj.key[start:]
            parts = rel.split("/")
            if rel.endswith("/") or any(not p or p.startswith(".") for p in parts):
                continue  # folder markers, hidden files and folders
            if Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
                yield rel, obj.size, obj.mtime_ns


Root = FolderRoot | BucketRoot


def open_root(root: str | Path | Root, settings: Settings | None = None) -> Root:
    """A catalogue root from what a user typed: a folder, or s3://bucket/prefix read
    with the storage settings' endpoint and region."""
    if isinstance(root, FolderRoot | BucketRoot):
        return root
    text = str(root)
    if not text.startswith(S3_SCHEME):
        return FolderRoot(Path(text).expanduser().resolve())
    name, _, prefix = text[len(S3_SCHEME) :].partition("/")
    if not name:
        raise CatalogueError(f"{text}: name the bucket, as in s3://bucket/catalogue")
    bucket = Bucket.from_settings(name, settings) if settings else Bucket(name)
    return BucketRoot(bucket, prefix.strip("/"))


@dataclass(frozen=True)
class CatalogueFile:
    path: Path | str  # absolute path, or the s3:// URL of an object
    rel: str  # relative to the root, "/"-separated: what the database records
    size: int
    mtime_ns: int
    implant: ImplantRecord
    root: Root  # plain data: a file can be read in any process that has the settings

    def read(self, max_bytes: int) -> bytes:
        """The file's bytes (refused unread when over `max_bytes`)."""
        return self.root.read(self.rel, max_bytes)


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
    root: Root
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


def scan(root: str | Path | Root) -> Scan:
    """Every image under `root/<Manufacturer>/<Implant name>/` (any depth below the
    implant folder), with its implant's metadata: folder names, overridden by
    `root/catalogue.csv` rows. Problems are collected, never raised, except for a
    root that is not a readable folder (or an s3:// prefix that cannot be listed)."""
    root = open_root(root)
    if isinstance(root, FolderRoot) and not root.exists():
        raise CatalogueError(f"{root} is not a folder; give the catalogue's root folder")
    problems: list[Problem] = []
    folder_rows, file_rows = _read_csv(root, problems)
    files: list[CatalogueFile] = []
    try:
        for rel, size, mtime_ns in root.walk(problems):
            rel_parts = rel.split("/")
            if len(rel_parts) < 3:
                continue  # files beside the manufacturer folders are not images of an implant
            folder = "/".join(rel_parts[:2])
            row = file_rows.get(rel) or folder_rows.get(folder)
            if row is not None:
                row.used = True
            implant = _implant(rel_parts[0], rel_parts[1], row)
            files.append(
                CatalogueFile(root.location(rel), rel, size, mtime_ns, implant, root)
                if isinstance(root, BucketRoot)
                else CatalogueFile(root.path / rel, rel, size, mtime_ns, implant, root)
            )
    except RaioxError as exc:  # a bucket that cannot be listed: nothing to go on
        raise CatalogueError(str(exc)) from exc
    for rows in (folder_rows, file_rows):
        for target, row in rows.items():
            if not row.used:
                problems.append(
                    Problem(CSV_NAME, f"path {target!r} matches no image in {root}", row.number)
                )
    return Scan(root, files, problems)


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


def _read_csv(root: Root, problems: list[Problem]) -> tuple[dict[str, _Row], dict[str, _Row]]:
    """catalogue.csv -> rows by implant folder and rows by image path."""
    folder_rows: dict[str, _Row] = {}
    file_rows: dict[str, _Row] = {}
    try:
        data = root.read_optional(CSV_NAME)
        if data is None:
            return folder_rows, file_rows
        with io.StringIO(data.decode("utf-8-sig"), newline="") as fh:
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
    except (OSError, csv.Error, RaioxError) as exc:
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
