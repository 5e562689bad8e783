"""The nightly job: sync every recorded catalogue folder, fill in missing
embeddings, and switch the catalogue to another model safely.

A model switch embeds every image with the new model *beside* the old rows
(image_embeddings holds one row per image and model, each model with its own
partial HNSW index), so search keeps answering from the old model. Only when
no image lacks a new embedding does `settings.active_model` flip, in one
transaction; then the old model's rows and index are dropped. A killed switch
resumes where it stopped when the same command runs again.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psycopg

from raiox_cli import embedding, images
from raiox_cli.catalogue import pipeline
from raiox_cli.catalogue import scan as catalogue
from raiox_cli.catalogue.ingest import (
    Failure,
    IngestOptions,
    IngestReport,
    ModelHandle,
    Prepared,
    Progress,
    RootIngest,
    embed_batch,
    writer_lock,
)
from raiox_cli.catalogue.pipeline import Writer, run_pipeline, worker_count
from raiox_cli.clinics import retention
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import precision
from raiox_cli.errors import ModelMismatch, ModelUnavailable, RaioxError
from raiox_cli.store import objects as storage
from raiox_cli.store import orphans

PAGE = 1000  # images fetched per query when filling in missing embeddings


@dataclass
class ReindexReport:
    model_id: str
    previous_model_id: str | None
    roots: list[IngestReport] = field(default_factory=list)
    reembedded: int = 0
    switched: bool = False
    removed_models: list[str] = field(default_factory=list)
    removed_embeddings: int = 0
    pending: int = 0  # images still without an embedding from model_id
    failed: list[Failure] = field(default_factory=list)
    model_loaded: bool = False
    purged: dict[str, Any] | None = None  # RAIOX_RETENTION_DAYS applied (retention.purge)
    orphans: dict[str, Any] | None = None  # objects no row names (store/orphans.py)
    onnx_export: str | None = None  # the ONNX backend's export folder, when it runs the model
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and all(r.ok for r in self.roots)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["roots"] = [r.to_dict() for r in self.roots]
        data["failed"] = [asdict(f) for f in self.failed]
        data["elapsed_s"] = round(self.elapsed_s, 3)
        return data


def _apply_retention(conn: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    """Purge analyses older than RAIOX_RETENTION_DAYS (cron's nightly run)."""
    days = settings.retention_days or 0
    purged = retention.purge(conn, storage.open_store(settings), older_than_s=days * 86400.0)
    return purged.to_dict()


def target_spec(
    settings: Settings, active: queries.ModelRow | None, switch: bool
) -> embedding.ModelSpec:
    """The model to reindex with: the requested one when switching, else the
    catalogue's active model (so a cron job's environment cannot switch by accident)."""
    spec = embedding.ModelSpec.from_settings(settings)
    if switch or active is None or embedding.model_id(spec) == active.model_id:
        return spec
    recorded = embedding.parse_model_id(active.model_id)
    if recorded.from_file:
        raise ModelMismatch(
            f"the catalogue's model {active.model_id} was loaded from a local file; set "
            f"RAIOX_MODEL={recorded.name} and RAIOX_WEIGHTS to that file, or switch models with "
            '"raiox reindex --model ..."'
        )
    return replace(
        spec,
        name=recorded.name,
        pretrained=recorded.tag,
        weights=None,
        precision=recorded.precision,
    )


def reindex(
    settings: Settings,
    *,
    switch: bool = False,
    wait: bool = False,
    store: bool = True,
    progress: Progress | None = None,
) -> ReindexReport:
    """Re-ingest (with prune) every catalogue root recorded in the database, embed
    every image that lacks the target model's embedding, then make the target
    model active if it is not already and drop the models it replaced."""
    start = time.perf_counter()
    with writer_lock(settings, wait=wait, command="reindex") as conn:
        active = queries.active_model(conn)
        spec = target_spec(settings, active, switch)
        _prepare_int8(conn, settings, spec)
        model = ModelHandle(spec, activate=active is None)
        report = ReindexReport(model.model_id, active.model_id if active else None)
        options = IngestOptions(prune=True, store=store)
        for path in queries.catalogue_root_paths(conn):
            root = catalogue.open_root(path, settings)
            if not _reachable(root):
                if queries.forget_empty_catalogue_root(conn, path):
                    continue  # moved away and re-ingested elsewhere: nothing refers to it
                # An unmounted share must not look like an emptied catalogue.
                report.failed.append(
                    Failure(path, "catalogue folder is missing; skipped, its images are kept")
                )
                continue
            report.roots.append(RootIngest(conn, settings, root, model, options, progress).run())
        report.reembedded = _embed_missing(conn, settings, model, report, progress)
        _switch(conn, model, active, report)
        report.model_loaded = model.loaded
        if settings.retention_days is not None:
            report.purged = _apply_retention(conn, settings)
        if store:
            conn.commit()  # the sweep reads what every other writer committed
            found = orphans.sweep(
                conn, storage.open_store(settings), grace_s=settings.orphan_grace_s
            )
            report.orphans = found.to_dict()
    # Export (outside the writer lock) now, so the morning's first search does not.
    try:
        report.onnx_export = embedding.prepare_backend(model.spec)
    except ModelUnavailable as exc:
        report.failed.append(Failure(model.model_id, f"ONNX export: {exc}"))
    report.elapsed_s = time.perf_counter() - start
    return report


def _switch(
    conn: psycopg.Connection,
    model: ModelHandle,
    active: queries.ModelRow | None,
    report: ReindexReport,
) -> None:
    if active is not None and active.model_id == model.model_id:
        report.pending = queries.count_images_missing_embedding(conn, model.model_id)
        return
    with conn.transaction():
        queries.lock_settings(conn)
        if queries.get_model(conn, model.model_id) is None:
            model.ensure_registered(conn)  # an empty catalogue: nothing was embedded
        report.pending = queries.count_images_missing_embedding(conn, model.model_id)
        if report.pending:
            report.failed.append(
                Failure(
                    model.model_id,
                    f"{report.pending} images still lack an embedding from this model; search "
                    "stays on the previous model; fix the failures above and run reindex again",
                )
            )
            return
        queries.activate_model(conn, model.model_id)
        # No calibration holds for other embeddings: search stops applying them.
        previous = active.model_id if active else "none"
        queries.mark_calibrations_stale(
            conn, f"the catalogue switched from {previous} to {model.model_id}"
        )
        report.switched = True
    for old in queries.other_models(conn, model.model_id):
        with conn.transaction():
            report.removed_embeddings += queries.delete_model(conn, old)
            report.removed_models.append(old.model_id)
    queries.analyze_embeddings(conn)


def _embed_missing(
    conn: psycopg.Connection,
    settings: Settings,
    model: ModelHandle,
    report: ReindexReport,
    progress: Progress | None,
) -> int:
    """Embed, with the target model, images that still lack it (a model switch, or
    images whose folder is gone): bytes from the source file when it still has the
    same content, else from the image store."""
    total = queries.count_images_missing_embedding(conn, model.model_id)
    if total == 0:
        return 0
    store = storage.open_store(settings)
    done = embedded = 0
    batch: list[Prepared] = []
    writer = Writer(settings, lambda c, b: _write(c, model, b))
    writer.start()

    def flush() -> None:
        nonlocal embedded
        if batch:
            writer.put(
                ([p.item["id"] for p in batch], embed_batch(model, [p.row for p in batch if p.row]))
            )
            embedded += len(batch)
            batch.clear()

    def handle(p: Prepared) -> None:
        nonlocal done
        done += 1
        if p.kind == "failed":
            report.failed.append(Failure(_describe(p.item), p.reason))
        else:
            batch.append(p)
            if len(batch) >= settings.batch_size:
                flush()
        if progress:
            progress("re-embed", done, total)

    try:
        after = 0
        while rows := queries.images_missing_embedding(
            conn, model.model_id, after_id=after, limit=PAGE
        ):
            after = rows[-1]["id"]
            run_pipeline(
                rows,
                lambda row: _prepare(row, settings, model, store),
                handle,
                workers=worker_count(settings),
                batch_size=settings.batch_size,
            )
        flush()
    finally:
        writer.close()
    return embedded


def _prepare_int8(conn: psycopg.Connection, settings: Settings, spec: embedding.ModelSpec) -> None:
    """Quantise the int8 model now, on the catalogue's own images (the parity gate),
    when int8 is asked for or auto may choose it; auto takes a refusal as fp32."""
    if spec.precision not in ("int8", "auto"):
        return
    int8 = replace(spec, precision="int8")
    if (
        spec.precision == "auto"
        and embedding.resolve_backend(replace(spec, precision="fp32")) != "onnx"
    ):
        return
    try:
        embedding.prepare_backend(int8, samples=lambda: gate_samples(conn, settings))
    except embedding.PrecisionRefused:
        if spec.precision == "int8":
            raise


def gate_samples(conn: psycopg.Connection, settings: Settings) -> list[precision.Sample]:
    """The catalogue's images for the int8 parity gate (one per implant first);
    images whose bytes cannot be found or decoded are left out."""
    store = storage.open_store(settings)
    samples = []
    for row in queries.sample_images(conn, limit=precision.MAX_SAMPLES):
        try:
            data = original_bytes(row, settings, store)
            image = images.load_image(data, max_pixels=settings.max_pixels, sha256=row["sha256"])
        except RaioxError:
            continue
        samples.append(precision.Sample(row["implant_key"], image.image))
    return samples


def _describe(row: dict[str, Any]) -> str:
    if row.get("root_path") and row.get("source_path"):
        return catalogue.open_root(row["root_path"]).location(row["source_path"])
    return f"image {row['id']} ({row['sha256'][:12]})"


def _prepare(
    row: dict[str, Any], settings: Settings, model: ModelHandle, store: storage.Store
) -> Prepared:
    try:
        data = original_bytes(row, settings, store)
    except RaioxError as exc:
        return Prepared("failed", row, reason=str(exc))
    decoded = pipeline.decode(
        {"data": data, "sha256": row["sha256"]},
        transform=model.get().preprocessor,
        max_pixels=settings.max_pixels,
        max_bytes=settings.max_bytes,
        decode_to=model.get().preprocessor.decode_to,
    )
    if decoded.get("error"):
        return Prepared("failed", row, reason=decoded["error"])
    return Prepared("embed", row, row["sha256"], decoded)


def _reachable(root: catalogue.Root) -> bool:
    try:
        return root.exists()
    except RaioxError:  # a bucket that cannot be listed now: like an unmounted share
        return False


def original_bytes(row: dict[str, Any], settings: Settings, store: storage.Store) -> bytes:
    if row.get("root_path") and row.get("source_path"):
        root = catalogue.open_root(row["root_path"], settings)
        try:
            data = root.read(row["source_path"], settings.max_bytes)
        except RaioxError:  # changed or gone: the image store may still have it
            data = b""
        if hashlib.sha256(data).hexdigest() == row["sha256"]:
            return data
    if row.get("storage_key"):
        data = store.get(row["storage_key"])
        if hashlib.sha256(data).hexdigest() == row["sha256"]:
            return data
    raise storage.StorageError(
        "the original bytes are neither in the catalogue folder (changed or gone) nor in "
        "the image store; run raiox ingest on its folder (with --prune to drop it)"
    )


def _write(conn: psycopg.Connection, model: ModelHandle, batch: tuple[list[int], Any]) -> None:
    ids, vectors = batch
    model.ensure_registered(conn)
    queries.copy_embeddings(conn, model.model_id, zip(ids, vectors, strict=True))
