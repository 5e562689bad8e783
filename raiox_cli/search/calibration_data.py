"""Queries with a known answer for `raiox calibrate`, from three sources:

- **labels**: X-rays in the `raiox eval` layout (a folder or CSV), searched as search does;
- **confirmed**: analyses this model answered that a dentist confirmed (a catalogue
  implant, or "not in the catalogue"), scored from the ranked scores stored with them;
- **catalogue**: day one, no X-ray needed. Catalogue images, through training/augment.py's
  radiograph augmentations, searched in memory against the catalogue without that image
  (an in-catalogue query) and without their whole implant (an out-of-catalogue one).

Calibration must not reuse what `raiox adapt` trained on (conformal guarantees need
queries exchangeable with new ones): for an adapted model the catalogue source uses
only the implants its model card says were held out of training, and the confirmed
source only analyses made after the card was written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from raiox_cli import db, embedding, images
from raiox_cli.catalogue.reindex import original_bytes
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.search import calibrate, evaluate
from raiox_cli.search import query as search
from raiox_cli.search.calibrate import DEPTH, NoCalibrationData, Sample
from raiox_cli.store import objects as storage
from raiox_cli.training import augment

log = logging.getLogger(__name__)

SOURCES = ("labels", "confirmed", "catalogue")
CATALOGUE_QUERIES = 400  # augmented catalogue images: each an in- and an out-of-catalogue query
MIN_CONFIRMED = 100  # confirmations of this model before `auto` prefers them to the catalogue
CARD_FILE = "model-card.json"  # training/adapt.py writes it beside the weights


class OneImplant(RaioxError):
    """A catalogue of one implant has nothing to tell it apart from."""


class UnknownLabels(UsageError):
    """--labels names implants the catalogue does not have."""


@dataclass
class CalibrateReport:
    calibration: calibrate.Calibration
    why: str  # why this source
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.calibration.to_dict(), "why": self.why, "notes": self.notes}


# --- what adapt trained on -------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """What the active model's own training saw, from its model card (if adapted)."""

    adapted: bool
    held_out: frozenset[str] | None = None  # implant keys never trained on
    trained_until: datetime | None = None  # confirmations before it may be in training
    card: str | None = None
    extra_implants: int = 0  # designs outside the catalogue it trained on (--extra-labels)


def training_of(settings: Settings) -> Training:
    if settings.weights is None:
        return Training(adapted=False)
    card_path = Path(settings.weights).parent / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return Training(adapted=True)
    created = card.get("created_at")
    until = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ") if created else None
    return Training(
        adapted=True,
        held_out=frozenset(card.get("data", {}).get("held_out_implants", [])),
        trained_until=until.replace(tzinfo=timezone.utc) if until else None,
        card=str(card_path),
        extra_implants=int(card.get("data", {}).get("extra_implants") or 0),
    )


# --- sources -------------------------------------------------------------------------


def labels_samples(
    conn: psycopg.Connection,
    embedder: embedding.Embedder,
    settings: Settings,
    source: Path,
) -> tuple[list[Sample], dict[str, Any]]:
    """Labelled X-rays searched exactly as `raiox search` does."""
    labelled = evaluate.labelled_queries(source)
    index = evaluate._label_index(conn)
    unknown = [q for q in labelled if index.get(evaluate._normalise(q.label)) is None]
    if unknown:
        first = unknown[0]
        raise UnknownLabels(
            f"{len(unknown)} of {len(labelled)} labels name no implant of the catalogue, e.g. "
            f"{first.label!r} ({first.path}); correct them, or ingest those implants first"
        )
    by_path = {q.path: index[evaluate._normalise(q.label)] for q in labelled}
    samples, unreadable = evaluate.searched_samples(conn, embedder, settings, by_path)
    counts = {"labelled_xrays": len(samples), "unreadable": unreadable, "labels": str(source)}
    return samples, counts


def confirmed_samples(
    conn: psycopg.Connection, model_id: str, training: Training, since: datetime | None
) -> tuple[list[Sample], dict[str, Any]]:
    """Confirmed analyses of this model, from the ranked scores stored with each."""
    if training.trained_until is not None and (since is None or since < training.trained_until):
        since = training.trained_until  # older confirmations may be in its training data
    samples = []
    for row in queries.confirmed_trust_outcomes(conn, model_id, since=since):
        ranked = row["trust"]["ranked"]
        keys = [key for key, _ in ranked]
        scores = tuple(float(score) for _, score in ranked)
        identity = f"confirmed\t{row['analysis_id']}"
        if row["not_in_catalogue"]:
            samples.append(Sample(scores, None, False, identity))
        else:
            key = row["implant_key"]
            rank = keys.index(key) + 1 if key in keys else None
            samples.append(Sample(scores, rank, True, identity))
    inside = sum(s.in_catalogue for s in samples)
    counts = {
        "confirmed": inside,
        "confirmed_not_in_catalogue": len(samples) - inside,
        "since": since.isoformat() if since else None,
    }
    return samples, counts


def _array(vector: Any) -> np.ndarray:
    """A pgvector value (Vector, or an array with register_vector) as float32."""
    return np.asarray(vector.to_numpy() if hasattr(vector, "to_numpy") else vector, np.float32)


@dataclass(frozen=True)
class Gallery:
    """The catalogue's embeddings of one model, in memory."""

    rows: list[dict[str, Any]]
    vectors: np.ndarray  # (images, D)
    implant_of: np.ndarray  # (images,) index into keys
    keys: list[str]

    @classmethod
    def load(cls, conn: psycopg.Connection, model_id: str) -> Gallery:
        rows = queries.calibration_gallery(conn, model_id)
        keys = sorted({row["key"] for row in rows})
        position = {key: i for i, key in enumerate(keys)}
        vectors = np.stack([_array(r.pop("embedding")) for r in rows])
        return cls(rows, vectors, np.array([position[r["key"]] for r in rows]), keys)

    def ranked(self, similarity: np.ndarray, leave_out: np.ndarray) -> np.ndarray:
        """Best score per implant (images in leave_out skipped), best first: DEPTH + 1."""
        best = np.full(len(self.keys), -np.inf)
        kept = ~leave_out
        np.maximum.at(best, self.implant_of[kept], similarity[kept])
        order = np.argsort(-best, kind="stable")
        return order[np.isfinite(best[order])][: DEPTH + 1], best


def _query_images(
    gallery: Gallery, training: Training, n: int, rng: np.random.Generator
) -> list[int]:
    """Which catalogue images become queries: every eligible image in turn, n in all."""
    eligible = [
        i
        for i, row in enumerate(gallery.rows)
        if training.held_out is None or row["key"] in training.held_out
    ]
    if not eligible:
        raise NoCalibrationData(
            "the adapted model trained on every implant (its model card holds none out), so "
            'the catalogue cannot calibrate it; use "--source labels --labels DIR" with X-rays '
            "it did not train on, or confirmations made after it"
        )
    picks: list[int] = []
    while len(picks) < n:
        picks.extend(rng.permutation(eligible).tolist())
    return picks[:n]


def catalogue_samples(
    conn: psycopg.Connection,
    embedder: embedding.Embedder,
    settings: Settings,
    training: Training,
    *,
    n: int = CATALOGUE_QUERIES,
    seed: int = 0,
) -> tuple[list[Sample], dict[str, Any]]:
    """Augmented catalogue images as queries (see the module's docstring)."""
    gallery = Gallery.load(conn, embedder.model_id)
    rng = np.random.default_rng(seed)
    picks = _query_images(gallery, training, n, rng)
    store = storage.open_store(settings)
    samples: list[Sample] = []
    unreadable: set[int] = set()
    for index, vectors in _embedded(picks, gallery, settings, store, embedder, seed, unreadable):
        similarity = (vectors @ gallery.vectors.T).max(axis=0)
        implant = gallery.implant_of[index]
        identity = f"catalogue\t{gallery.rows[index]['sha256']}\t{len(samples)}\t{seed}"
        alone = np.zeros(len(gallery.rows), dtype=bool)
        alone[index] = True
        order, best = gallery.ranked(similarity, alone)
        if (gallery.implant_of == implant).sum() > 1:  # its implant has other images
            found = np.flatnonzero(order == implant)
            rank = int(found[0]) + 1 if len(found) else None
            samples.append(Sample(tuple(best[order].tolist()), rank, True, identity + "\tin"))
        order, best = gallery.ranked(similarity, gallery.implant_of == implant)
        if len(order):
            samples.append(Sample(tuple(best[order].tolist()), None, False, identity + "\tout"))
    inside = sum(s.in_catalogue for s in samples)
    counts = {
        "catalogue_in": inside,
        "catalogue_out": len(samples) - inside,
        "catalogue_images": len(gallery.rows),
        "implants": len(gallery.keys),
        "unreadable_images": len(unreadable),
        "augmentation": "training/augment.py DEFAULT",
        "kept_apart": (
            f"only the {len(training.held_out)} implants the model card held out of training"
            if training.held_out is not None
            else "the model was not adapted: nothing of the catalogue was trained on"
            if not training.adapted
            else "unknown: no model card beside the weights"
        ),
    }
    return samples, counts


def _embedded(
    picks: Sequence[int],
    gallery: Gallery,
    settings: Settings,
    store: storage.Store,
    embedder: embedding.Embedder,
    seed: int,
    unreadable: set[int],
    batch: int = 32,
) -> Iterator[tuple[int, np.ndarray]]:
    """(image index, one vector per orientation) of each pick, augmented with its own
    seeded generator (the same seed gives the same queries)."""
    decoded: dict[int, Any] = {}
    for start in range(0, len(picks), batch):
        pictures, spans = [], []
        for offset, index in enumerate(picks[start : start + batch]):
            if index not in decoded:
                decoded[index] = _decode(gallery.rows[index], settings, store)
            if decoded[index] is None:
                unreadable.add(index)
                continue
            rng = np.random.default_rng([seed, start + offset])
            variant = augment.augment(decoded[index], rng)
            views, _ = search.oriented(variant, settings.tta)
            spans.append((index, len(pictures), len(views)))
            pictures.extend(views)
        if not pictures:
            continue
        vectors = embedder.embed_images(pictures, batch_size=batch)
        for index, first, count in spans:
            yield index, vectors[first : first + count]


def _decode(row: dict[str, Any], settings: Settings, store: storage.Store) -> Any:
    try:
        data = original_bytes(row, settings, store)
        return images.load_image(data, max_pixels=settings.max_pixels).image.convert("L")
    except (RaioxError, images.ImageError) as exc:
        log.warning("catalogue image %s skipped: %s", row["sha256"][:12], exc)
        return None


# --- the command ---------------------------------------------------------------------


def _choose(
    conn: psycopg.Connection,
    source: str,
    labels: Path | None,
    model_id: str,
    training: Training,
    since: datetime | None,
) -> tuple[str, str]:
    if source != "auto":
        return source, f"--source {source}"
    if labels is not None:
        return "labels", "--labels given: labelled X-rays are the best evidence"
    confirmed, _ = confirmed_samples(conn, model_id, training, since)
    if sum(s.in_catalogue for s in confirmed) >= MIN_CONFIRMED:
        return "confirmed", f"{len(confirmed)} confirmations of this model's answers"
    return "catalogue", (
        f"{sum(s.in_catalogue for s in confirmed)} confirmations of this model's answers "
        f"(fewer than {MIN_CONFIRMED}) and no --labels: the catalogue simulates X-rays"
    )


def calibrate_source(
    settings: Settings,
    *,
    target: float = calibrate.DEFAULT_TARGET,
    false_alarm: float = calibrate.DEFAULT_FALSE_ALARM,
    source: str = "auto",
    labels: Path | None = None,
    since: datetime | None = None,
    queries_n: int = CATALOGUE_QUERIES,
    seed: int = 0,
    load_embedder: Callable[[], embedding.Embedder] | None = None,
) -> CalibrateReport:
    """`raiox calibrate`: gather queries with known answers, fit, store with the model."""
    calibrate.check_rate("--target", target)
    calibrate.check_rate("--false-alarm", false_alarm)
    if source not in (*SOURCES, "auto"):
        raise UsageError(f"--source must be one of auto, {', '.join(SOURCES)}; got {source!r}")
    if source == "labels" and labels is None:
        raise UsageError("--source labels needs --labels DIR (X-rays in the raiox eval layout)")
    if labels is not None and source not in ("labels", "auto"):
        raise UsageError(f"--labels goes with --source labels (or auto), not {source}")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    spec = embedding.ModelSpec.from_settings(settings)
    training = training_of(settings)
    with db.connect(settings) as conn:
        db.check_schema(conn)
        model = search.catalogue_model(conn, embedding.model_id(spec))
        implants = queries.count_searchable_implants(conn, model)
        if implants < 2:
            raise OneImplant(
                f"the catalogue has {implants} implant: calibration needs at least 2 to tell "
                'apart; ingest more implants ("raiox ingest PATH")'
            )
        chosen, why = _choose(conn, source, labels, model.model_id, training, since)
        embedder = load_embedder or (lambda: embedding.load_embedder(spec))
        if chosen == "labels":
            assert labels is not None
            samples, counts = labels_samples(conn, embedder(), settings, labels)
        elif chosen == "confirmed":
            samples, counts = confirmed_samples(conn, model.model_id, training, since)
            if not samples:
                raise NoCalibrationData(
                    f"no confirmed analysis answered by {model.model_id}: confirm results "
                    '("raiox confirm ANALYSIS_ID IMPLANT_KEY") or use --source catalogue'
                )
        else:
            samples, counts = catalogue_samples(
                conn, embedder(), settings, training, n=queries_n, seed=seed
            )
        counts["implants_in_catalogue"] = implants
        if training.card:
            counts["model_card"] = training.card
        calibration = calibrate.fit(
            samples,
            model_id=model.model_id,
            target=target,
            false_alarm=false_alarm,
            tta=settings.tta,
            source=chosen,
            counts=counts,
            seed=seed,
        )
        stored = calibrate.store(conn, calibration)
        conn.commit()
    notes = []
    if stored.params["set_threshold"] is None:
        held = stored.metrics.get("in_sample") or {}
        notes.append(
            f"a {target:.0%} coverage needs more than the {calibrate.DEPTH} nearest implants "
            f"for this model: its sets hold all {calibrate.DEPTH} and covered "
            f"{held.get('coverage') or 0:.0%} of these queries; a better model (raiox adapt) "
            "or a lower --target"
        )
    if calibrate.random_weights(model.model_id):
        notes.append("random model weights: search never applies this calibration (tests only)")
    if chosen == "catalogue" and training.extra_implants:
        notes.append(
            f"the model also trained on {training.extra_implants} designs outside the "
            "catalogue (adapt --extra-labels); on such models the catalogue's simulated "
            "X-rays set the out-of-catalogue threshold too high (measured: 7-13% false alarms "
            "for 5% asked, bench/README.md); calibrate on labelled X-rays as soon as you "
            "have them (--labels DIR) or confirmations"
        )
    return CalibrateReport(stored, why, notes)


def show(settings: Settings) -> calibrate.Calibration:
    """`raiox calibrate --show`: the active model's latest calibration."""
    with db.connect(settings) as conn:
        db.check_schema(conn)
        model = queries.active_model(conn)
        if model is None:
            raise calibrate.NotCalibrated('the catalogue is empty; run "raiox ingest PATH" first')
        found = calibrate.load(conn, model.model_id)
    if found is None:
        raise calibrate.NotCalibrated(
            f'model {model.model_id} has no calibration yet; run "raiox calibrate"'
        )
    return found


def refit_stale(settings: Settings) -> dict[str, Any] | None:
    """The nightly reindex: when a model was ever calibrated and the active model's
    calibration is missing or stale (a model switch), refit it from the best source
    there is (auto, with the previous target). None when nothing needed it."""
    with db.connect(settings) as conn:
        model = queries.active_model(conn)
        if model is None or not queries.calibrations_exist(conn):
            return None
        current = calibrate.load(conn, model.model_id)
        last = queries.latest_calibration_any(conn)
    if current is not None and not current.stale:
        return None
    why = "stale" if current is not None else "missing after a model switch"
    previous = current or (calibrate.Calibration.from_row(last) if last else None)
    target = previous.target if previous else calibrate.DEFAULT_TARGET
    false_alarm = previous.false_alarm if previous else calibrate.DEFAULT_FALSE_ALARM
    recorded = embedding.parse_model_id(model.model_id)
    if recorded.from_file and settings.weights is None:
        return {"refitted": False, "reason": why, "error": "set RAIOX_WEIGHTS to the model file"}
    if not recorded.from_file:  # the catalogue's model, whatever cron's environment says
        settings = settings.replace(
            model=recorded.name,
            pretrained=recorded.tag,
            weights=None,
            precision=recorded.precision,
        )
    try:
        report = calibrate_source(settings, target=target, false_alarm=false_alarm)
    except RaioxError as exc:
        return {"refitted": False, "reason": why, "error": str(exc)}
    fit = report.calibration
    held = fit.metrics.get("held_out_half") or {}
    return {
        "refitted": True,
        "reason": why,
        "source": fit.source,
        "why": report.why,
        "counts": fit.counts,
        "coverage": held.get("coverage"),
        "target": fit.target,
        "ece": held.get("ece"),
    }
