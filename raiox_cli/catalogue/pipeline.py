"""The read -> decode -> embed -> write stages that ingest, reindex and batch search
share, and the local engine that schedules them.

Stages are plain functions over plain data, so whichever engine runs them (the
threads below, or engines/ray.py on Ray Data) the same input gives the same rows
(STYLE.md rule 14). A *row* is a dict of plain values; each stage adds keys:

    key        set by                 value
    path       the caller             str: where the bytes come from (a file path)
    data       read                   bytes: the file's content
    sha256     read                   str: hex sha256 of `data` (the content key)
    pixels     decode                 float32 array (V, 3, H, W): one preprocessed
                                      image per view (orientation), the model's input
    views      decode                 list[str]: the V orientation names, in order
    format, width, height, crop_box   decode: what images.load_image learned
    vectors    embed                  float32 array (V, D): unit vectors (pixels dropped)
    error      any stage              str: why this row failed; later stages pass it
                                      through untouched

Callers may add their own keys (ingest keeps its catalogue entry there); stages
never touch keys they do not own. The stages:

    read(row, max_bytes=)                                   one row, I/O bound
    decode(row, transform=, max_pixels=, max_bytes=,        one row, CPU bound
           crop=, views=)                                   (Pillow releases the GIL)
    embed(rows, embedder)                                   a batch: ONE forward pass
                                                            for every view of every row
    write                                                   the caller's: rows -> DB/file

`rows_of` / `columns_of` convert between rows and a columnar batch (Ray Data's
dict of columns) for engines that move batches as columns.

The local engine: `LocalEngine.map` runs a per-row function in decode threads
(ordered, a bounded window ahead), the caller batches rows with `Batcher` and
embeds them in its own thread, and a `Writer` thread with its own database
connection applies each batch in one transaction, so the model never waits for
the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import psycopg

from raiox_cli import db, images
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import RaioxError

if TYPE_CHECKING:
    from PIL import Image

    from raiox_cli.embedding import Embedder
    from raiox_cli.images import Crop

Row = dict[str, Any]
Transform = Callable[["Image.Image"], np.ndarray]  # PIL image -> float32 (3, H, W)
T = TypeVar("T")
R = TypeVar("R")

WRITER_QUEUE = 4  # batches waiting for the database; bounds memory
DECODE_NICE = 10  # decode threads yield the cores to the model's threads

# The query as taken, mirrored, and upside down: upper-jaw implants appear inverted
# relative to lower-jaw catalogue shots, and left/right depends on the view.
ORIENTATIONS = ("original", "mirrored", "upside-down")


# --- the stages ------------------------------------------------------------------------


def read(row: Row, *, max_bytes: int, reader: Callable[[str, int], bytes] | None = None) -> Row:
    """Stage 1: the bytes of row["path"] and their sha256 (or row["error"]).
    `reader(path, max_bytes)`: where the bytes come from (default: a local file; a
    catalogue root passes its own, e.g. S3)."""
    if row.get("error"):
        return row
    try:
        if reader is None:
            data = images.read_bytes(Path(row["path"]), max_bytes)
        else:
            data = reader(row["path"], max_bytes)
    except RaioxError as exc:  # ImageError, StorageError: this row only
        row["error"] = str(exc)
        return row
    row["data"] = data
    row["sha256"] = hashlib.sha256(data).hexdigest()
    return row


def decode(
    row: Row,
    *,
    transform: Transform,
    max_pixels: int,
    max_bytes: int,
    crop: Crop | None = None,
    views: Sequence[str] = ORIENTATIONS[:1],
    decode_to: int | None = None,
) -> Row:
    """Stage 2: row["data"] -> row["pixels"], one preprocessed image per view.
    `transform` is the model's preprocessing (`Embedder.preprocessor`: picklable, no
    model inside), so decode workers of any engine need no model. `decode_to`
    (`Preprocess.decode_to`): let a large JPEG decode at a reduced scale (catalogue
    paths; search decodes queries in full, so batch and single searches agree)."""
    if row.get("error"):
        return row
    try:
        loaded = images.load_image(
            row["data"],
            max_pixels=max_pixels,
            max_bytes=max_bytes,
            crop=crop,
            sha256=row.get("sha256"),
            decode_to=decode_to,
        )
        pixels = views_of(loaded.image, transform, views)
    except RaioxError as exc:
        row["error"] = str(exc)
        return row
    row.update(
        pixels=pixels,
        views=list(views),
        format=loaded.format,
        width=loaded.width,
        height=loaded.height,
        crop_box=loaded.crop_box,
        sha256=loaded.sha256,
    )
    return row


def embed(rows: list[Row], embedder: Embedder) -> list[Row]:
    """Stage 3: every view of every good row through the model in ONE batch;
    row["vectors"] (V, D) replaces row["pixels"]."""
    good = [row for row in rows if not row.get("error") and row.get("pixels") is not None]
    if not good:
        return rows
    stacked = np.concatenate([row["pixels"] for row in good])
    vectors = embedder.embed_tensors(stacked)
    start = 0
    for row in good:
        count = len(row["pixels"])
        row["vectors"] = vectors[start : start + count]
        row["pixels"] = None  # free the pixels before the rows reach the writer
        start += count
    return rows


# Each orientation as a flip of the preprocessed (3, S, S) array.
ARRAY_FLIPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda a: a,
    "mirrored": lambda a: a[:, :, ::-1],
    "upside-down": lambda a: a[:, ::-1, :],
}


def views_of(image: Image.Image, transform: Transform, views: Sequence[str]) -> np.ndarray:
    """(len(views), 3, S, S): the image preprocessed once, each orientation a flip of
    that array, not another resize of a flipped picture (a third of the CPU with TTA;
    cosine to the flipped-picture way >= 0.9999, bench/README.md "TTA")."""
    pixels = transform(image)
    return np.stack([ARRAY_FLIPS[view](pixels) for view in views])


def oriented(image: Image.Image, views: Sequence[str]) -> list[Image.Image]:
    """The image in each named orientation (ORIENTATIONS)."""
    from PIL import ImageOps

    flips = {"original": lambda i: i, "mirrored": ImageOps.mirror, "upside-down": ImageOps.flip}
    return [flips[view](image) for view in views]


def rows_of(batch: dict[str, Sequence[Any]]) -> list[Row]:
    """A columnar batch (Ray Data's dict of columns) as rows, for `embed`."""
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def columns_of(rows: list[Row]) -> dict[str, list[Any]]:
    """Rows back to a columnar batch (every key of any row; None where absent)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


# --- the local engine: threads ----------------------------------------------------------


class LocalEngine:
    """Runs a per-row stage function in decode threads, in input order, at most a
    window of rows ahead, so memory stays flat however long the input is."""

    def __init__(self, *, workers: int, batch_size: int):
        self.workers = max(1, workers)
        self.window = max(2 * self.workers, batch_size + self.workers)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        with ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="raiox-decode",
            initializer=_yield_to_model,
        ) as pool:
            yield from ordered_map(pool, fn, items, self.window)


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int
) -> Iterator[R]:
    """pool.map with at most `window` items in flight."""
    pending: deque[Future[R]] = deque()
    source = iter(items)
    for item in source:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        result = pending.popleft().result()
        for item in source:
            pending.append(pool.submit(fn, item))
            break
        yield result


def run_pipeline(
    items: Iterable[T],
    prepare: Callable[[T], R],
    handle: Callable[[R], None],
    *,
    workers: int,
    batch_size: int,
) -> None:
    """prepare() each item in decode threads; handle() each result here, in order."""
    for prepared in LocalEngine(workers=workers, batch_size=batch_size).map(prepare, items):
        handle(prepared)


def _yield_to_model() -> None:
    """Decode threads run at a lower priority (Linux nices threads one by one), so on
    a CPU-bound machine the model's threads keep the cores and decoding fills the
    gaps instead of preempting a matrix multiply that all its threads wait on.
    Relative to the process's own niceness: under `nice -n 10` (a cron reindex) an
    absolute 10 would put decoding level with the model again."""
    if DECODE_NICE and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + DECODE_NICE)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def worker_count(settings: Settings) -> int:
    return settings.workers if settings.workers > 0 else max(1, os.cpu_count() or 1)


class Batcher:
    """Collects rows until their views fill a model batch (`size` images: with TTA a
    batch holds the three orientations of size // 3 X-rays)."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.rows: list[Row] = []
        self.images = 0

    def add(self, row: Row) -> list[Row] | None:
        """Add a row; returns a full batch when this one completed it."""
        self.rows.append(row)
        pixels = row.get("pixels")
        if pixels is None:  # embedded already (the Ray engine embeds in its actors)
            pixels = row.get("vectors")
        self.images += len(pixels) if pixels is not None else 0
        return self.take() if self.images >= self.size else None

    def take(self) -> list[Row]:
        rows, self.rows, self.images = self.rows, [], 0
        return rows


class Writer(threading.Thread):
    """Applies batches with its own connection, one transaction each, in order;
    `after(what apply returned)` runs once that transaction has committed (e.g. to
    write result lines to a file only for what the database kept)."""

    def __init__(
        self,
        settings: Settings,
        apply: Callable[[psycopg.Connection, Any], Any],
        after: Callable[[Any], None] | None = None,
    ):
        super().__init__(name="raiox-writer", daemon=True)
        self.settings = settings
        self.apply = apply
        self.after = after
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=WRITER_QUEUE)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with db.connect(self.settings) as conn:
                queries.set_application_name(conn, f"raiox writer (pid {os.getpid()})")
                conn.commit()
                while (batch := self.queue.get()) is not None:
                    with conn.transaction():
                        applied = self.apply(conn, batch)
                    if self.after is not None:
                        self.after(applied)
        except BaseException as exc:
            self.error = exc
            while self.queue.get() is not None:  # unblock the producer until it stops
                pass

    def put(self, batch: Any) -> None:
        self._raise()
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
