"""The catalogue pipeline: scan -> skip unchanged -> decode -> embed -> store.

The stages and the local engine are pipeline.py's. Decode workers (threads: Pillow
releases the GIL) read, hash, decode and preprocess files ahead of the model; the
calling thread only batches tensors through the model; a writer thread with its
own connection upserts rows and COPYs embeddings, one transaction per batch, so the
model never waits for the database and a killed run loses at most the batches in
flight. Every write is an idempotent upsert, so running the same command again
finishes the job.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from raiox_cli import db, embedding
from raiox_cli.catalogue import engines, pipeline
from raiox_cli.catalogue import scan as catalogue
from raiox_cli.catalogue.pipeline import Writer
from raiox_cli.clinics import privacy
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import Busy, ModelMismatch, RaioxError
from raiox_cli.store import objects as storage

Progress = Callable[[str, int, int], None]  # (phase, done, total)
TOUCH_BATCH = 500  # metadata-only rows (touched or moved files) per transaction


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class IngestReport:
    root: str
    model_id: str
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    duplicates: int = 0
    embedded: int = 0
    implants_new: int = 0
    implants_updated: int = 0
    implants_removed: int = 0
    failed: list[Failure] = field(default_factory=list)
    model_loaded: bool = False
    dry_run: bool = False
    index_valid: bool | None = None
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failed"] = [asdict(f) for f in self.failed]
        data["images_per_s"] = round(self.images_per_s, 2)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        return data


# --- the writer lock ----------------------------------------------------------------


@contextmanager
def writer_lock(settings: Settings, *, wait: bool, command: str) -> Iterator[psycopg.Connection]:
    """Hold the one-writer advisory lock for the duration; yields an autocommit
    connection (the lock's session) for reads and maintenance."""
    conn = db.connect(settings, autocommit=True)
    try:
        db.check_schema(conn)
        queries.set_application_name(conn, f"raiox {command} (pid {os.getpid()})")
        if not queries.try_writer_lock(conn):
            if not wait:
                raise Busy(f"{_holder(conn)}; try again later, or pass --wait to queue behind it")
            queries.wait_writer_lock(conn)
        yield conn
        if not conn.closed:
            queries.release_writer_lock(conn)
    finally:
        conn.close()  # ends the session, which releases the lock on any other way out


def _holder(conn: psycopg.Connection) -> str:
    holder = queries.writer_lock_holder(conn)
    if holder is None:
        return "another ingest/reindex holds the writer lock"
    name = holder["application_name"] or "an unnamed client"
    where = f" from {holder['client_addr']}" if holder["client_addr"] else ""
    since = holder["backend_start"].strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return f"{name} holds the writer lock (server pid {holder['pid']}{where}, connected {since})"


# --- the model, loaded only when something needs embedding ---------------------------


class ModelHandle:
    """The target model: its id is known up front; it is loaded on first use."""

    def __init__(self, spec: embedding.ModelSpec, *, activate: bool):
        self.spec = spec
        self.model_id = embedding.model_id(spec)
        self.activate = activate  # make it the active model if there is none yet
        self._embedder: embedding.Embedder | None = None
        self._lock = threading.Lock()
        self.registered = False

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def get(self) -> embedding.Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = embedding.load_embedder(self.spec)
            return self._embedder

    def ensure_registered(self, conn: psycopg.Connection) -> None:
        """Record the model and its HNSW index (in the caller's transaction)."""
        if self.registered:
            return
        embedder = self.get()
        weights = embedding.weights_file(self.spec)  # recorded: followed when unconfigured
        if weights is not None or queries.get_model(conn, self.model_id) is None:
            queries.register_model(
                conn, self.model_id, embedder.dim, embedder.preprocess_version, weights=weights
            )
        if self.activate and queries.active_model(conn) is None:
            queries.activate_model(conn, self.model_id)
        self.registered = True


# --- ingest's work items (the stages and their engine live in pipeline.py) ------------


@dataclass
class Prepared:
    """A work item after the decode worker: ready to embed, to record, or failed."""

    kind: str  # "embed", "touch" (content known: record only), "duplicate", "failed"
    item: Any
    sha256: str | None = None
    row: pipeline.Row | None = None  # the pipeline row: pixels, then vectors
    info: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def embed_batch(model: ModelHandle, rows: list[pipeline.Row]) -> np.ndarray:
    """One forward pass over rows of one view each; their (N, D) vectors."""
    pipeline.embed(rows, model.get())
    return np.stack([row["vectors"][0] for row in rows])


# --- ingest one catalogue root ----------------------------------------------------------


@dataclass(frozen=True)
class IngestOptions:
    prune: bool = False
    dry_run: bool = False
    store: bool = True
    wait: bool = False


def ingest_catalogue(
    settings: Settings,
    root: str | Path,
    options: IngestOptions = IngestOptions(),
    *,
    progress: Progress | None = None,
) -> IngestReport:
    """Bring the database in line with one catalogue folder or s3://bucket/prefix
    (see docs/guides/catalogue.md). Returns what happened; per-file failures are
    in `report.failed`, never raised."""
    spec = embedding.ModelSpec.from_settings(settings)
    model = ModelHandle(spec, activate=True)
    engines.check(settings)  # e.g. --engine ray without Ray: say how to install it, now
    if options.dry_run:
        with db.connect(settings, autocommit=True) as conn:
            db.check_schema(conn)
            return RootIngest(conn, settings, root, model, options, progress).dry_run()
    with writer_lock(settings, wait=options.wait, command="ingest") as conn:
        active = queries.active_model(conn)
        if active is not None and active.model_id != model.model_id:
            theirs = embedding.parse_model_id(active.model_id)
            ours = embedding.parse_model_id(model.model_id)
            if (theirs.name, theirs.tag) == (ours.name, ours.tag):
                raise ModelMismatch(
                    f"the catalogue is embedded with {active.model_id}, not {model.model_id}; "
                    f"ingest with RAIOX_PRECISION={theirs.precision}, or switch the whole "
                    f'catalogue with "raiox reindex --precision {ours.precision}"'
                )
            name, tag = theirs.name, theirs.tag
            raise ModelMismatch(
                f"the catalogue is embedded with {active.model_id}, not {model.model_id}; "
                f"ingest with --model {name} --pretrained {tag}, or switch the whole "
                f'catalogue with "raiox reindex --model {spec.name} --pretrained {spec.pretrained}"'
            )
        return RootIngest(conn, settings, root, model, options, progress).run()


@dataclass(frozen=True)
class FilePrep:
    """The decode-side work on one catalogue file, as plain data so that any engine
    can run it (the local engine in decode threads, the Ray engine in tasks on other
    machines): the read stage, then decode only for content the catalogue does not
    already have an embedding for, then the image store."""

    root_id: int
    known: dict[tuple[str, str], dict[str, Any]]  # (implant key, sha256) -> its row
    scan_paths: frozenset[str]
    # embedding.preprocess.Preprocess (picklable, no model inside), or in this process the
    # ModelHandle, so that a run with nothing to decode never loads the model.
    transform: Any
    store: storage.Store | None
    settings: Settings  # Settings.for_workers(): limits and storage, no secrets

    def __call__(self, f: catalogue.CatalogueFile) -> Prepared:
        row = pipeline.read(
            {"path": f.rel}, max_bytes=self.settings.max_bytes, reader=lambda _, n: f.read(n)
        )
        if row.get("error"):
            return Prepared("failed", f, reason=row["error"])
        sha = row["sha256"]
        known = self.known.get((f.implant.key, sha))
        if known is not None and known["embedded"]:
            elsewhere = known["root_id"] != self.root_id or known["source_path"] != f.rel
            if elsewhere and self._still_there(known):
                return Prepared("duplicate", f, sha)
            return Prepared("touch", f, sha)  # same path, or moved here: adopt the row
        transform = self.transform
        if isinstance(transform, ModelHandle):
            transform = transform.get().preprocessor
        row = pipeline.decode(
            row,
            transform=transform,
            max_pixels=self.settings.max_pixels,
            max_bytes=self.settings.max_bytes,
            decode_to=transform.decode_to,
        )
        if row.get("error"):
            return Prepared("failed", f, reason=row["error"])
        try:
            key = (  # de-identified copy (privacy.py); embedded from the original pixels
                privacy.store_image(
                    self.store, row["data"], row["format"], self.settings, sha256=sha
                )
                if self.store is not None
                else None
            )
        except RaioxError as exc:  # StorageError: this file only
            return Prepared("failed", f, reason=str(exc))
        row["data"] = None
        info = {
            "format": row["format"],
            "width": row["width"],
            "height": row["height"],
            "storage_key": key,
        }
        return Prepared("embed", f, sha, row, info)

    def _still_there(self, known: dict[str, Any]) -> bool:
        """Whether the file a known image was recorded from still exists (then this
        file is a duplicate of it; otherwise it moved here, even from another root)."""
        if known["root_id"] == self.root_id:
            return known["source_path"] in self.scan_paths
        if known["root_path"] is None or known["source_path"] is None:
            return False
        try:
            root = catalogue.open_root(known["root_path"], self.settings)
            return root.has(known["source_path"])
        except RaioxError:  # unreachable: as if it were gone
            return False


class RootIngest:
    """One run over one catalogue root, holding the writer lock (conn's session)."""

    def __init__(
        self,
        conn: psycopg.Connection,
        settings: Settings,
        root: str | Path | catalogue.Root,
        model: ModelHandle,
        options: IngestOptions,
        progress: Progress | None,
    ):
        self.conn = conn
        self.settings = settings
        self.root = catalogue.open_root(root, settings)
        self.model = model
        self.options = options
        self.progress = progress or (lambda phase, done, total: None)
        self.report = IngestReport(str(self.root), model.model_id, dry_run=options.dry_run)
        self.store = storage.open_store(settings) if options.store and not options.dry_run else None
        self._implant_ids: dict[str, int] = {}
        self._emptied: list[int] = []

    # -- planning -------------------------------------------------------------------

    def _plan(self) -> tuple[catalogue.Scan, list[catalogue.CatalogueFile], dict[str, Any]]:
        scan = catalogue.scan(self.root)
        self.report.failed.extend(Failure(p.file, str(p)) for p in scan.problems)
        self.root_id = self._root_id()
        known = (
            queries.root_images(self.conn, self.root_id, self.model.model_id)
            if self.root_id is not None
            else []
        )
        self.by_path = {row["source_path"]: row for row in known}
        todo = []
        for f in scan.files:
            row = self.by_path.get(f.rel)
            if (
                row is not None
                and row["embedded"]
                and row["file_size"] == f.size
                and row["file_mtime_ns"] == f.mtime_ns
                and row["key"] == f.implant.key
            ):
                self.report.unchanged += 1
            else:
                todo.append(f)
        self.scan_paths = {f.rel for f in scan.files}
        stored = queries.implants_by_key(self.conn, list(scan.implants))
        self.stored_implants = stored
        return scan, todo, stored

    def _root_id(self) -> int | None:
        if self.options.dry_run:
            return queries.catalogue_root_id(self.conn, str(self.root))
        return queries.upsert_catalogue_root(self.conn, str(self.root))

    def _gone(self) -> list[dict[str, Any]]:
        return [row for path, row in self.by_path.items() if path not in self.scan_paths]

    def dry_run(self) -> IngestReport:
        start = time.perf_counter()
        scan, todo, stored = self._plan()
        for f in todo:
            if f.rel in self.by_path:
                self.report.updated += 1
            else:
                self.report.new += 1
        for key, implant in scan.implants.items():
            if key not in stored:
                self.report.implants_new += 1
            elif _differs(stored[key], implant):
                self.report.implants_updated += 1
        if self.options.prune:
            self.report.removed = len(self._gone())
        self.report.elapsed_s = time.perf_counter() - start
        return self.report

    # -- the run --------------------------------------------------------------------

    def run(self) -> IngestReport:
        start = time.perf_counter()
        scan, todo, stored = self._plan()
        with self.conn.transaction():
            for key, implant in scan.implants.items():
                if key in stored and _differs(stored[key], implant):
                    queries.upsert_implant(self.conn, implant.as_row())
                    self.report.implants_updated += 1
        self._implant_ids = {key: row["id"] for key, row in stored.items()}
        known = queries.images_of_implants(self.conn, list(scan.implants), self.model.model_id)
        self.known = {(row["key"], row["sha256"]): row for row in known}
        wrote = bool(todo)
        if todo:
            # New or changed files: the model (an ONNX session) loads while the
            # decode workers and the writer start.
            embedding.preload(self.model.spec)
            self._pipeline(todo)
        if self.options.prune:
            # Re-read: rows may have moved to other paths during the run.
            self.by_path = {
                row["source_path"]: row
                for row in queries.root_images(self.conn, self.root_id, self.model.model_id)
            }
            gone = self._gone()
            if gone:
                with self.conn.transaction():
                    emptied = queries.delete_images(self.conn, [row["id"] for row in gone])
                    self._emptied.extend(emptied)
                    self.report.removed = len(gone)
                wrote = True
        if self._emptied:
            with self.conn.transaction():
                self.report.implants_removed = queries.delete_imageless_implants(
                    self.conn, self._emptied
                )
        queries.mark_root_ingested(self.conn, self.root_id)
        if wrote:
            self.finish_bulk_load()
        self.report.model_loaded = self.model.loaded
        self.report.elapsed_s = time.perf_counter() - start
        return self.report

    def finish_bulk_load(self) -> None:
        queries.analyze_embeddings(self.conn)
        model = queries.get_model(self.conn, self.model.model_id)
        if model is not None:
            if not queries.model_index_valid(self.conn, model):
                queries.reindex_model_index(self.conn, model)
            self.report.index_valid = queries.model_index_valid(self.conn, model)

    def _pipeline(self, todo: list[catalogue.CatalogueFile]) -> None:
        writer = Writer(self.settings, self._write)
        writer.start()
        embed: list[Prepared] = []
        touch: list[Prepared] = []
        seen: set[tuple[str, str]] = set()
        done = 0
        self.progress("ingest", 0, len(todo))

        def handle(p: Prepared) -> None:
            nonlocal done
            f: catalogue.CatalogueFile = p.item
            done += 1
            if p.kind == "failed":
                self.report.failed.append(Failure(f.rel, p.reason))
            elif p.kind == "duplicate" or (f.implant.key, p.sha256) in seen:
                self.report.duplicates += 1
            else:
                seen.add((f.implant.key, p.sha256 or ""))
                if p.kind == "touch":
                    self.report.unchanged += 1
                    touch.append(p)
                else:
                    previous = self.by_path.get(f.rel)
                    if previous is None:
                        self.report.new += 1
                    elif previous["sha256"] == p.sha256 and previous["key"] == f.implant.key:
                        self.report.unchanged += 1  # same content, embedded for a new model
                    else:
                        self.report.updated += 1
                    embed.append(p)
            if len(embed) >= self.settings.batch_size:
                self._flush(writer, embed)
            if len(touch) >= TOUCH_BATCH:
                writer.put((touch[:], None))
                touch.clear()
            self.progress("ingest", done, len(todo))

        prepare = FilePrep(
            self.root_id,
            self.known,
            frozenset(self.scan_paths),
            self.model.get().preprocessor if self.settings.engine == "ray" else self.model,
            self.store,
            self.settings.for_workers(),
        )
        try:
            with engines.open_engine(self.settings, self.model.spec) as engine:
                for prepared in engine.map(prepare, todo):
                    handle(prepared)
            self._flush(writer, embed)
            if touch:
                writer.put((touch, None))
        finally:
            writer.close()

    def _flush(self, writer: Writer, batch: list[Prepared]) -> None:
        if not batch:
            return
        vectors = embed_batch(self.model, [p.row for p in batch if p.row is not None])
        for p in batch:
            p.row = None  # free the pixels before the rows reach the database
        writer.put((batch[:], vectors))
        self.report.embedded += len(batch)
        batch.clear()

    def _write(self, conn: psycopg.Connection, batch: tuple[list[Prepared], Any]) -> None:
        """In the writer thread, inside one transaction."""
        items, vectors = batch
        ids = []
        for p in items:
            f: catalogue.CatalogueFile = p.item
            if p.kind == "touch":
                image_id = self.known[(f.implant.key, p.sha256)]["id"]
                queries.move_image(
                    conn,
                    image_id,
                    root_id=self.root_id,
                    source_path=f.rel,
                    file_size=f.size,
                    file_mtime_ns=f.mtime_ns,
                )
                self._emptied.extend(
                    queries.delete_other_images_at(conn, self.root_id, f.rel, image_id)
                )
                continue
            image_id = queries.upsert_image(
                conn,
                {
                    "implant_id": self._implant_id(conn, f.implant),
                    "sha256": p.sha256,
                    "root_id": self.root_id,
                    "source_path": f.rel,
                    "file_size": f.size,
                    "file_mtime_ns": f.mtime_ns,
                    **p.info,
                },
            )
            self._emptied.extend(
                queries.delete_other_images_at(conn, self.root_id, f.rel, image_id)
            )
            ids.append(image_id)
        if vectors is not None:
            self.model.ensure_registered(conn)
            queries.copy_embeddings(conn, self.model.model_id, zip(ids, vectors, strict=True))

    def _implant_id(self, conn: psycopg.Connection, implant: catalogue.ImplantRecord) -> int:
        implant_id = self._implant_ids.get(implant.key)
        if implant_id is None:
            implant_id = queries.upsert_implant(conn, implant.as_row())
            self._implant_ids[implant.key] = implant_id
            self.report.implants_new += 1
        return implant_id


def _differs(stored: dict[str, Any], implant: catalogue.ImplantRecord) -> bool:
    new = implant.as_row()
    for column in ("name", "manufacturer", "system", "connection", "notes", "extra"):
        if (stored[column] or None) != (new[column] or None):
            return True
    for column in catalogue.NUMERIC_COLUMNS:
        a, b = stored[column], new[column]
        if (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-4 * max(1, b)):
            return True
    return False
