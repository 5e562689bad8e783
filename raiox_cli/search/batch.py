"""Batch identification: `raiox search` over many X-rays (files, folders, a list).

The pipeline.py stages, as in ingest: decode threads read and hash each file, skip
what an earlier run already answered with this model, decode and preprocess every
orientation; the calling thread sends the orientations of several X-rays through
the model in one batch; a writer thread with its own connection asks the database
about every vector of that batch in one statement per round
(search.search_many_vectors), then records the answers: JSON lines (stdout, or
`--out FILE`), `--csv FILE` and/or `--save` (analyses), one transaction per batch.

Resumable: with `--out`, `--csv` or `--save`, a rerun skips X-rays (path and
content sha256) already answered with the current model, so `kill -9` and the same
command again leave exactly what one clean run leaves. Files are appended and a
line cut short by a kill is dropped before resuming; the lines of a batch are
written only after its analyses committed.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg

from raiox_cli import analyses, db, embedding
from raiox_cli.catalogue import engines, pipeline
from raiox_cli.catalogue.scan import IMAGE_SUFFIXES
from raiox_cli.clinics import privacy
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import UsageError
from raiox_cli.images import Crop
from raiox_cli.search import query as search
from raiox_cli.store import objects as storage

Progress = Callable[[str, int, int], None]  # (phase, done, total)
Emit = Callable[[dict[str, Any]], None]

CSV_COLUMNS = (
    "path", "sha256", "model_id", "matches", "confident", "exact", "analysis_id", "rank",
    "implant_key", "name", "manufacturer", "system", "diameter_mm", "length_mm", "score",
    "margin", "orientation",
)  # fmt: skip


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class BatchOptions:
    k: int = 3
    crop: Crop | None = None
    manufacturer: str | None = None
    save: bool = False
    client_id: str | None = None
    out: Path | None = None  # JSON lines file (else: emitted, for stdout)
    csv: Path | None = None


@dataclass
class BatchReport:
    model_id: str
    inputs: int = 0
    answered: int = 0
    skipped: int = 0  # answered by an earlier run
    failed: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def per_s(self) -> float:
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failed"] = [asdict(f) for f in self.failed]
        data["per_s"] = round(self.per_s, 2)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        return data


# --- inputs -------------------------------------------------------------------------


def collect(paths: Sequence[Path], from_csv: Path | None = None) -> list[Path]:
    """Files as given, folders walked recursively (image names, hidden ones skipped,
    sorted), then the `path` column (or the first column) of `from_csv`, relative
    to the CSV's folder. A path that does not exist stays: it is reported later."""
    found: list[Path] = []
    for path in paths:
        found.extend(_walk(path) if path.is_dir() else [path])
    if from_csv is not None:
        found.extend(_listed(from_csv))
    return found


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name


def _listed(listing: Path) -> list[Path]:
    try:
        text = listing.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from {listing}: cannot read it ({exc})") from None
    rows = [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
    column = 0
    if rows and "path" in [cell.strip().lower() for cell in rows[0]]:
        column = [cell.strip().lower() for cell in rows[0]].index("path")
        rows = rows[1:]
    base = listing.parent
    return [base / row[column].strip() for row in rows if len(row) > column]


# --- where answers go (and what an earlier run answered) -------------------------------


class _LineFile:
    """An append-only results file; what it already holds counts as answered."""

    def __init__(self, path: Path, model_id: str):
        self.path = path
        self.model_id = model_id

    def _complete_text(self) -> str:
        """The file's complete lines; a last line cut short by a kill is removed."""
        if not self.path.exists():
            return ""
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
        return data[:keep].decode("utf-8")

    def append(self, text: str) -> None:
        if not text:
            return
        data = text.encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)


class JsonLinesFile(_LineFile):
    def answered(self) -> set[tuple[str, str]]:
        done = set()
        for line in self._complete_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("model_id") == self.model_id:
                done.add((record.get("path"), record.get("sha256")))
        return done

    def write(self, records: list[dict[str, Any]]) -> None:
        self.append("".join(json.dumps(r, default=str) + "\n" for r in records))


class CsvFile(_LineFile):
    """One row per match (an X-ray without matches: one row with no match columns);
    `matches` says how many rows the X-ray has, so a part cut off counts as not done."""

    def answered(self) -> set[tuple[str, str]]:
        text = self._complete_text()
        if not text:
            self.append(",".join(CSV_COLUMNS) + "\n")
            return set()
        seen: dict[tuple[str, str], list[int]] = {}
        for row in csv.DictReader(text.splitlines()):
            if row.get("model_id") != self.model_id:
                continue
            counts = seen.setdefault((row["path"], row["sha256"]), [0, 0])
            counts[0] += 1
            counts[1] = max(1, int(row.get("matches") or 0))
        return {key for key, (rows, wanted) in seen.items() if rows >= wanted}

    def write(self, records: list[dict[str, Any]]) -> None:
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for record in records:
            head = [
                record["path"], record["sha256"], record["model_id"], len(record["matches"]),
                record["confident"], record["exact"], record["analysis_id"],
            ]  # fmt: skip
            for m in record["matches"] or [None]:
                writer.writerow(head + (_match_cells(m) if m else [None] * 10))
        self.append(buffer.getvalue())


def _match_cells(m: dict[str, Any]) -> list[Any]:
    margin = None if m["margin"] is None else round(m["margin"], 6)
    return [
        m["rank"], m["key"], m["name"], m["manufacturer"], m["system"], m["diameter_mm"],
        m["length_mm"], round(m["score"], 6), margin, m["orientation"],
    ]  # fmt: skip


# --- the run -----------------------------------------------------------------------------


def search_many(
    settings: Settings,
    paths: Sequence[Path],
    options: BatchOptions = BatchOptions(),
    *,
    emit: Emit | None = None,
    progress: Progress | None = None,
) -> BatchReport:
    """Identify every X-ray in `paths` (see module doc). Answers go to the files in
    options, else to `emit` (one JSON-ready dict per X-ray, in input order);
    per-file failures are in the report, never raised."""
    started = time.perf_counter()
    engines.check(settings)  # e.g. --engine ray without Ray: say how to install it, now
    spec = embedding.ModelSpec.from_settings(settings)
    report = BatchReport(embedding.model_id(spec), inputs=len(paths))
    files = [
        sink(path, report.model_id)
        for sink, path in ((JsonLinesFile, options.out), (CsvFile, options.csv))
        if path is not None
    ]
    with db.connect(settings) as conn:
        db.check_schema(conn)
        model = search.catalogue_model(conn, report.model_id)
        in_files = [f.answered() for f in files]
        saved = _saved(conn, report.model_id) if options.save else None
    embedder = embedding.load_embedder(spec)
    run = _Run(settings, options, report, model, embedder, files, in_files, saved, emit)
    progress = progress or (lambda phase, done, total: None)
    progress("search", 0, len(paths))
    writer = pipeline.Writer(settings, run.search_and_record, run.publish)
    writer.start()
    batcher = pipeline.Batcher(settings.batch_size)
    rows_per_batch = max(1, settings.batch_size // len(run.views))
    done = 0
    try:
        # The Ray engine returns rows embedded already: pipeline.embed passes them on.
        with engines.open_engine(settings, spec, batch_size=rows_per_batch) as engine:
            for row in engine.map(run.prepare, paths):
                done += 1
                if row.get("error"):
                    report.failed.append(Failure(row["path"], row["error"]))
                elif row.get("skip"):
                    report.skipped += 1
                elif (full := batcher.add(row)) is not None:
                    writer.put(pipeline.embed(full, embedder))
                progress("search", done, len(paths))
        if batcher.rows:
            writer.put(pipeline.embed(batcher.take(), embedder))
    finally:
        writer.close()
    report.elapsed_s = time.perf_counter() - started
    return report


def _saved(conn: psycopg.Connection, model_id: str) -> set[tuple[str, str]]:
    return queries.answered_analyses(conn, model_id=model_id, source="cli")


@dataclass(frozen=True)
class QueryPrep:
    """The decode-side work on one X-ray, as plain data so that any engine can run
    it (decode threads here, Ray tasks elsewhere): read, skip what is answered
    everywhere it should be, decode every orientation, keep the bytes (--save)."""

    settings: Settings  # Settings.for_workers(): limits and storage, no secrets
    crop: Crop | None
    views: tuple[str, ...]
    transform: Any  # embedding.preprocess.Preprocess: picklable, no model inside
    in_files: tuple[frozenset[tuple[str, str]], ...]  # answered, per results file
    saved: frozenset[tuple[str, str]] | None  # answered as analyses (--save)
    resumable: bool
    store: Any  # storage.Store, with --save

    def __call__(self, path: Path) -> pipeline.Row:
        row = pipeline.read({"path": str(path)}, max_bytes=self.settings.max_bytes)
        if row.get("error"):
            return row
        key = (row["path"], row["sha256"])
        row["lines"] = [key not in answered for answered in self.in_files]
        row["save"] = self.saved is not None and key not in self.saved
        if self.resumable and not row["save"] and not any(row["lines"]):
            row["skip"] = True
            row["data"] = None
            return row
        row = pipeline.decode(
            row,
            transform=self.transform,
            max_pixels=self.settings.max_pixels,
            max_bytes=self.settings.max_bytes,
            crop=self.crop,
            views=self.views,
        )
        if not row.get("error") and row["save"] and self.store is not None:
            try:
                row["storage_key"] = privacy.store_image(
                    self.store, row["data"], row["format"], self.settings
                )
            except Exception as exc:  # storage clients raise many classes
                row["error"] = f"could not store the X-ray: {exc}"
        row["data"] = None
        return row


class _Run:
    """One batch search: the stage functions with their settings bound."""

    def __init__(
        self,
        settings: Settings,
        options: BatchOptions,
        report: BatchReport,
        model: queries.ModelRow,
        embedder: embedding.Embedder,
        files: list[_LineFile],
        in_files: list[set[tuple[str, str]]],
        saved: set[tuple[str, str]] | None,
        emit: Emit | None,
    ):
        self.settings = settings
        self.options = options
        self.report = report
        self.model = model
        self.embedder = embedder
        self.files = files
        self.in_files = in_files
        self.saved = saved
        self.emit = emit if not files else None
        self.views = search.ORIENTATIONS if settings.tta else search.ORIENTATIONS[:1]
        store = None
        if options.save:
            store = storage.open_store(settings)
        self.prepare = QueryPrep(
            settings.for_workers(),
            options.crop,
            tuple(self.views),
            embedder.preprocessor,
            tuple(frozenset(answered) for answered in in_files),
            None if saved is None else frozenset(saved),
            bool(files) or saved is not None,
            store,
        )

    def search_and_record(
        self, conn: psycopg.Connection, rows: list[pipeline.Row]
    ) -> list[tuple[pipeline.Row, dict[str, Any]]]:
        """In the writer thread, inside one transaction: every orientation of every
        X-ray of the batch to the database at once, then the analyses (--save)."""
        options = self.options
        results = search.search_many_vectors(
            conn,
            self.model,
            [row["vectors"] for row in rows],
            [row["views"] for row in rows],
            k=options.k,
            manufacturer=options.manufacturer,
            ef_search=self.settings.ef_search,
            min_score=self.settings.min_score,
            min_margin=self.settings.min_margin,
        )
        answered = []
        for row, result in zip(rows, results, strict=True):
            crop = tuple(row["crop_box"]) if row.get("crop_box") else None
            result = replace(result, crop_box=crop)
            if not result.matches and options.manufacturer:
                note = f"no implant of manufacturer {options.manufacturer!r} in the catalogue"
                if note not in self.report.notes:
                    self.report.notes.append(note)
            if row["save"]:
                analysis_id = analyses.save_search(
                    conn,
                    result,
                    row["sha256"],
                    query_path=row["path"],
                    client_id=options.client_id,
                    storage_key=row.get("storage_key"),
                    channels=analyses.Channels.of(self.settings),
                )
                result = replace(result, analysis_id=analysis_id)
            record = search.result_json(row["path"], options.k, result)
            record.update(path=row["path"], sha256=row["sha256"])
            answered.append((row, record))
        return answered

    def publish(self, answered: list[tuple[pipeline.Row, dict[str, Any]]]) -> None:
        """After the batch's transaction committed: the result lines."""
        for index, sink in enumerate(self.files):
            sink.write([record for row, record in answered if row["lines"][index]])
        if self.emit is not None:
            for _, record in answered:
                self.emit(record)
        self.report.answered += len(answered)
