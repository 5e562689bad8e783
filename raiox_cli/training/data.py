"""Stage 1, data: every labelled image (catalogue, confirmed X-rays, --labels folders),
split into training images and held-out validation queries by a generator passed in."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli import images
from raiox_cli.catalogue.reindex import original_bytes
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import RaioxError
from raiox_cli.files import sha256_of
from raiox_cli.search import evaluate
from raiox_cli.store import objects as storage
from raiox_cli.training.options import AdaptOptions, NoTrainingData

if TYPE_CHECKING:
    import psycopg
    from PIL import Image

SPLITS = ("catalogue", "xrays", "unseen")
EXTRA_PREFIX = "extra:"  # the key of an --extra-labels implant the catalogue lacks


@dataclass(frozen=True)
class Item:
    """One labelled image: where its bytes are and what it shows."""

    key: str
    sha256: str
    kind: str  # "catalogue", "xray", or "extra" (--extra-labels: training only)
    origin: str  # for messages: a path, or "image <id>"
    path: Path | None = None
    row: dict[str, Any] | None = None


@dataclass
class Data:
    train: dict[str, list[Item]]  # implant key -> training images
    gallery: list[Item]  # what evaluation searches: catalogue images not used as queries
    splits: dict[str, list[Item]]  # validation queries per split
    held_out: list[str]  # implant keys never trained on
    skipped: list[str] = field(default_factory=list)  # "origin: reason"
    confirmed: int = 0  # X-rays confirmed in the database (the rest came from folders)

    @property
    def train_images(self) -> int:
        return sum(len(v) for v in self.train.values())

    def snapshot(self) -> dict[str, Any]:
        """Counts and a hash of the (implant key, sha256) list: what the run saw."""
        everything = [i for items in self.train.values() for i in items]
        everything += self.gallery + [i for q in self.splits.values() for i in q]
        catalogue = {(i.key, i.sha256) for i in everything if i.kind == "catalogue"}
        xrays = {(i.key, i.sha256) for i in everything if i.kind == "xray"}
        extra = {(i.key, i.sha256) for i in everything if i.kind == "extra"}
        per_implant: dict[str, int] = {}
        for key, _ in catalogue:
            per_implant[key] = per_implant.get(key, 0) + 1
        counts = sorted(per_implant.values()) or [0]
        lines = sorted(
            f"{kind}\t{k}\t{s}"
            for kind, pairs in (("c", catalogue), ("x", xrays), ("e", extra))
            for k, s in pairs
        )
        return {
            "implants": len({i.key for i in everything if not i.key.startswith(EXTRA_PREFIX)}),
            "trained_implants": len([k for k in self.train if not k.startswith(EXTRA_PREFIX)]),
            "held_out_implants": sorted(self.held_out),
            "catalogue_images": len(catalogue),
            "xrays": len(xrays),
            "confirmed_xrays": self.confirmed,
            "extra_images": len(extra),
            "extra_implants": len({k for k, _ in extra if k.startswith(EXTRA_PREFIX)}),
            "images_per_implant": {
                "min": counts[0],
                "median": float(np.median(counts)),
                "max": counts[-1],
            },
            "train_images": self.train_images,
            "gallery_images": len(self.gallery),
            "validation_queries": {name: len(q) for name, q in self.splits.items()},
            "skipped": len(self.skipped),
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        }


def catalogue_items(conn: psycopg.Connection) -> list[Item]:
    return [
        Item(
            row["key"],
            row["sha256"],
            "catalogue",
            str(Path(row["root_path"]) / row["source_path"])
            if row.get("root_path") and row.get("source_path")
            else f"image {row['id']}",
            row=row,
        )
        for row in queries.training_images(conn)
    ]


def _labelled_items(
    conn: psycopg.Connection, source: Path, kind: str
) -> tuple[list[Item], list[str]]:
    """A folder in the `raiox eval` layout (or its CSV) as items of `kind`, each label
    resolved to its implant key. An X-ray ("xray") whose label names no catalogue
    implant is skipped; an "extra" one becomes an implant of its own (EXTRA_PREFIX).
    Unreadable files are skipped."""
    index = evaluate._label_index(conn)
    found, skipped = [], []
    for query in evaluate.labelled_queries(source):
        label = evaluate._normalise(query.label)
        key = index.get(label) or (f"{EXTRA_PREFIX}{label}" if kind == "extra" else None)
        if key is None:
            skipped.append(f"{query.path}: label {query.label!r} names no implant in the catalogue")
            continue
        try:
            digest = sha256_of(query.path)
        except OSError as exc:
            skipped.append(f"{query.path}: {exc.strerror or exc}")
            continue
        found.append(Item(key, digest, kind, str(query.path), path=query.path))
    return found, skipped


def xray_items(conn: psycopg.Connection, source: Path) -> tuple[list[Item], list[str]]:
    """Labelled X-rays from a folder in the `raiox eval` layout (or its CSV), their
    labels resolved to implant keys; unknown labels and unreadable files skipped."""
    return _labelled_items(conn, source, "xray")


def extra_items(conn: psycopg.Connection, source: Path) -> tuple[list[Item], list[str]]:
    """--extra-labels: labelled images of implant designs the catalogue may not have
    (the `raiox eval` layout or its CSV). A label naming a catalogue implant adds to
    its training images; any other label becomes an implant of its own, keyed
    "extra:<manufacturer>/<name>", that the model trains on to learn what tells
    implant designs apart, and that is never searched, validated or calibrated on."""
    return _labelled_items(conn, source, "extra")


def confirmed_items(conn: psycopg.Connection) -> tuple[list[Item], list[str]]:
    """X-rays a dentist confirmed (`raiox confirm`, the feedback endpoint), read back
    from the image store; those whose implant has left the catalogue are skipped."""
    found, skipped = [], []
    for row in queries.confirmed_query_images(conn):
        origin = f"analysis {row['analysis_id']}"
        if row["implant_id"] is None:
            skipped.append(f"{origin}: confirmed implant {row['implant_key']} left the catalogue")
            continue
        stored = {"id": row["analysis_id"], "sha256": row["image_sha256"]}
        stored["storage_key"] = row["storage_key"]
        found.append(Item(row["implant_key"], row["image_sha256"], "xray", origin, row=stored))
    return found, skipped


def _unique(items: Sequence[Item]) -> list[Item]:
    seen: set[tuple[str, str]] = set()
    kept = []
    for item in items:
        if (item.key, item.sha256) not in seen:
            seen.add((item.key, item.sha256))
            kept.append(item)
    return kept


def split_data(
    catalogue: Sequence[Item],
    xrays: Sequence[Item],
    val_xrays: Sequence[Item],
    options: AdaptOptions,
    rng: np.random.Generator,
    extra: Sequence[Item] = (),
) -> Data:
    """Hold out whole implants, one catalogue image of each trained implant that has
    three or more, and a fraction of the X-rays; the rest is training data. Extra
    images (--extra-labels) only train, and never those of a held-out implant."""
    by_implant: dict[str, list[Item]] = {}
    for item in catalogue:
        by_implant.setdefault(item.key, []).append(item)
    keys = sorted(by_implant)
    candidates = [k for k in keys if len(by_implant[k]) >= 2]
    n_held = round(options.holdout_implants * len(keys))
    n_held = min(n_held, max(0, len(keys) - 2), len(candidates))
    held_out = sorted(rng.choice(candidates, size=n_held, replace=False).tolist()) if n_held else []
    held = set(held_out)

    train: dict[str, list[Item]] = {}
    gallery: list[Item] = []
    splits: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for key in keys:
        items = list(by_implant[key])
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        if key in held:
            splits["unseen"].append(items[0])
            gallery.extend(items[1:])
            continue
        n_val = options.val_images if len(items) >= 3 else 0
        splits["catalogue"].extend(items[:n_val])
        gallery.extend(items[n_val:])
        train[key] = items[n_val:]

    held_xrays = [x for x in xrays if x.key in held] + [x for x in val_xrays if x.key in held]
    if held_xrays:  # X-rays of unseen implants are the better test: they replace the views
        gallery.extend(splits["unseen"])
        splits["unseen"] = held_xrays
    seen_xrays = [x for x in xrays if x.key not in held]
    n_val = round(options.val_xrays * len(seen_xrays))
    if seen_xrays and n_val == 0 and options.val_xrays > 0 and len(seen_xrays) >= 2:
        n_val = 1
    order = rng.permutation(len(seen_xrays))
    for rank, index in enumerate(order):
        item = seen_xrays[index]
        if rank < n_val:
            splits["xrays"].append(item)
        else:
            train.setdefault(item.key, []).append(item)
    splits["xrays"].extend(x for x in val_xrays if x.key not in held)
    skipped = []
    for item in extra:
        if item.key in held:  # it would leak into the unseen validation and calibration
            skipped.append(f"{item.origin}: its implant is held out of training this run")
        else:
            train.setdefault(item.key, []).append(item)
    return Data(train, gallery, splits, held_out, skipped=skipped)


def collect_data(conn: psycopg.Connection, options: AdaptOptions, rng: np.random.Generator) -> Data:
    """Stage 1: every labelled image there is, split for training and validation."""
    catalogue = catalogue_items(conn)
    if not catalogue:
        raise NoTrainingData(
            "the catalogue has no images to train on; run raiox ingest on a catalogue first"
        )
    skipped: list[str] = []
    xrays: list[Item] = []
    val: list[Item] = []
    if options.confirmed:
        xrays, skipped = confirmed_items(conn)
    confirmed = len(xrays)
    if options.labels is not None:
        more_xrays, more = xray_items(conn, options.labels)
        xrays += more_xrays
        skipped += more
    if options.val_labels is not None:
        val, more = xray_items(conn, options.val_labels)
        skipped += more
    extra: list[Item] = []
    if options.extra_labels is not None:
        extra, more = extra_items(conn, options.extra_labels)
        skipped += more
    val = _unique(val)
    held_for_validation = {(i.key, i.sha256) for i in val}
    xrays = [i for i in _unique(xrays) if (i.key, i.sha256) not in held_for_validation]
    known = {i.sha256 for i in [*catalogue, *xrays, *val]}  # one role per image
    skipped += [
        f"{i.origin}: already a catalogue image or labelled X-ray of this run"
        for i in _unique(extra)
        if i.sha256 in known
    ]
    extra = [i for i in _unique(extra) if i.sha256 not in known]
    data = split_data(catalogue, xrays, val, options, rng, extra)
    data.skipped = skipped + data.skipped
    data.confirmed = confirmed
    if len(data.train) < 2:
        raise NoTrainingData(
            f"only {len(data.train)} implant(s) left to train on: contrastive training needs "
            "at least 2 implants with images (lower --holdout-implants, or add images)"
        )
    return data


def decode(item: Item, settings: Settings, store: storage.Store, longest: int) -> Image.Image:
    """An item's pixels, grey, its shortest side at most `longest` pixels."""
    from PIL import Image

    if item.row is not None:
        data = original_bytes(item.row, settings, store)
    else:
        assert item.path is not None
        data = images.read_bytes(item.path, settings.max_bytes)
    picture = images.load_image(data, max_pixels=settings.max_pixels).image.convert("L")
    w, h = picture.size
    scale = longest / min(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        picture = picture.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return picture


def load_pixels(
    data: Data, settings: Settings, image_size: int
) -> tuple[dict[str, Image.Image], dict[str, Image.Image]]:
    """Decode every image once: (training pixels, evaluation pixels) by sha256.
    Training images are kept small (augmentation runs on them every step);
    evaluation images large enough that preprocessing sees what search sees.
    An image that cannot be read is dropped from every set and reported."""
    store = storage.open_store(settings)
    train_px: dict[str, Image.Image] = {}
    eval_px: dict[str, Image.Image] = {}
    bad: set[str] = set()

    def get(item: Item, target: dict[str, Image.Image], longest: int) -> None:
        if item.sha256 in target or item.sha256 in bad:
            return
        try:
            target[item.sha256] = decode(item, settings, store, longest)
        except RaioxError as exc:
            bad.add(item.sha256)
            data.skipped.append(f"{item.origin}: {exc}")

    for items in data.train.values():
        for item in items:
            get(item, train_px, round(image_size * 1.25))
    for item in data.gallery + [i for q in data.splits.values() for i in q]:
        get(item, eval_px, image_size * 2)
    if bad:
        data.train = {
            k: kept
            for k, v in data.train.items()
            if (kept := [i for i in v if i.sha256 not in bad])
        }
        data.gallery = [i for i in data.gallery if i.sha256 not in bad]
        data.splits = {n: [i for i in q if i.sha256 not in bad] for n, q in data.splits.items()}
    return train_px, eval_px
