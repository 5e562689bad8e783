"""Measure a catalogue: labelled queries -> top-1/3/5 accuracy, MRR, confusions.

Labelled queries come as a folder laid out like a catalogue
(`<Manufacturer>/<Implant name>/*.png`) or as a CSV of `path,expected_key`
(paths relative to the CSV; the key is an implant key `manufacturer/system/name`
or just `manufacturer/name`). Labels match implants case- and space-insensitively.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from raiox_cli import db, embedding
from raiox_cli.catalogue import pipeline
from raiox_cli.catalogue.scan import IMAGE_SUFFIXES, implant_key
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import Embedder
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.search import calibrate
from raiox_cli.search import query as search
from raiox_cli.search.calibrate import Sample

DEPTH = 10  # implants ranked per query; MRR counts a label found deeper as 0
BATCH = 32


class NoLabelledQueries(UsageError):
    """The query folder or CSV holds no usable labelled image."""


@dataclass(frozen=True)
class LabelledQuery:
    path: Path
    label: str  # as given: a key, or manufacturer/name


@dataclass(frozen=True)
class Outcome:
    path: str
    label: str
    expected_key: str | None  # None: the label names no implant of the catalogue
    rank: int | None  # 1-based rank of the expected implant, None if not in the top DEPTH
    top: list[tuple[str, float]]  # (key, score) of the first matches
    error: str | None = None  # unreadable image

    @property
    def correct(self) -> bool:
        return self.rank == 1


@dataclass
class EvalReport:
    model_id: str
    tta: bool
    queries: int  # evaluated: readable and labelled with a catalogue implant
    top1: float
    top3: float
    top5: float
    mrr: float
    confused: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Outcome] = field(default_factory=list)  # expected implant not first
    skipped: list[Outcome] = field(default_factory=list)  # unreadable or unknown label
    # Best scores of right and wrong answers (min, median, max): where --min-score
    # should sit for this catalogue and model.
    scores_right: list[float] = field(default_factory=list)
    scores_wrong: list[float] = field(default_factory=list)
    depth: int = DEPTH
    # The calibration's numbers on these queries (calibrate.evaluation): ECE, Brier,
    # coverage, set sizes, open-set AUROC with --unknown.
    trust: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.suffix:
            yield path


def labelled_queries(source: Path) -> list[LabelledQuery]:
    """Read a labelled query folder (<Manufacturer>/<Implant name>/images) or CSV."""
    if source.is_file():
        with source.open(newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if row and not row[0].startswith("#")]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "expected_key"]:
            rows = rows[1:]
        found = [
            LabelledQuery(source.parent / row[0].strip(), row[1].strip())
            for row in rows
            if len(row) >= 2
        ]
    elif source.is_dir():
        found = [
            LabelledQuery(path, f"{manufacturer.name}/{implant.name}")
            for manufacturer in sorted(p for p in source.iterdir() if p.is_dir())
            for implant in sorted(p for p in manufacturer.iterdir() if p.is_dir())
            for path in _image_files(implant)
        ]
    else:
        raise NoLabelledQueries(f"{source} is neither a folder nor a CSV file")
    if not found:
        raise NoLabelledQueries(
            f"no labelled queries in {source}: expected <Manufacturer>/<Implant name>/*.png "
            "folders or a CSV of path,expected_key"
        )
    return found


def _label_index(conn: psycopg.Connection) -> dict[str, str]:
    """Every spelling a label may use -> implant key: the key itself and
    manufacturer/name (dropped when two systems share that pair)."""
    index: dict[str, str] = {}
    short: dict[str, set[str]] = {}
    for key in queries.implant_keys(conn):
        index[key] = key
        manufacturer, _, name = key.split("/")
        short.setdefault(f"{manufacturer}/{name}", set()).add(key)
    index.update({label: keys.pop() for label, keys in short.items() if len(keys) == 1})
    return index


def _normalise(label: str) -> str:
    parts = label.split("/")
    if len(parts) == 3:
        return implant_key(*parts)
    if len(parts) == 2:
        manufacturer, _, name = implant_key(parts[0], None, parts[1]).split("/")
        return f"{manufacturer}/{name}"
    return label


def resolve_label(conn: psycopg.Connection, label: str) -> str | None:
    """The implant key a label names (a key, or manufacturer/name, in any case and
    spacing), or None when it names no implant of the catalogue."""
    return _label_index(conn).get(_normalise(label.strip()))


def _vectors(
    embedder: Embedder, paths: Sequence[Path], settings: Settings, tta: bool
) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """(path, one vector per orientation or None, error), embedded in batches."""
    for start in range(0, len(paths), BATCH):
        batch, pictures, errors = [], [], {}
        for path in paths[start : start + BATCH]:
            try:
                image = search.load_query(path, settings).image
            except search.UnreadableQuery as exc:
                errors[path] = str(exc)
                continue
            views = search.ORIENTATIONS if tta else search.ORIENTATIONS[:1]
            batch.append((path, len(pictures), len(views)))
            pictures.extend(pipeline.views_of(image, embedder.preprocessor, views))
        vectors = _embed(embedder, pictures) if pictures else None
        done = {path: vectors[i : i + n] for path, i, n in batch if vectors is not None}
        for path in paths[start : start + BATCH]:
            yield path, done.get(path), errors.get(path)


def _embed(embedder: Embedder, pixels: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(
        [
            embedder.embed_tensors(np.stack(pixels[i : i + BATCH]))
            for i in range(0, len(pixels), BATCH)
        ]
    )


def unknown_samples(
    conn: psycopg.Connection, embedder: embedding.Embedder, settings: Settings, folder: Path
) -> tuple[list[Sample], int]:
    """X-rays of implants that are not in the catalogue (every image under `folder`)."""
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise NoLabelledQueries(f"no images under {folder} (--unknown)")
    return searched_samples(conn, embedder, settings, dict.fromkeys(paths))


def searched_samples(
    conn: psycopg.Connection,
    embedder: embedding.Embedder,
    settings: Settings,
    expected: dict[Path, str | None],
) -> tuple[list[Sample], int]:
    """Each X-ray searched exactly as `raiox search` does (expected implant key, or
    None for one not in the catalogue); and how many could not be read."""
    model = search.catalogue_model(conn, embedder.model_id)
    views = search.ORIENTATIONS if settings.tta else search.ORIENTATIONS[:1]
    samples, unreadable = [], 0
    for path, vectors, _error in _vectors(embedder, list(expected), settings, settings.tta):
        if vectors is None:
            unreadable += 1
            continue
        result = search.search_vectors(
            conn, model, vectors, k=DEPTH + 1, ef_search=settings.ef_search, orientations=views
        )
        keys = [m.key for m in result.matches]
        key = expected[path]
        rank = keys.index(key) + 1 if key in keys else None
        scores = tuple(m.score for m in result.matches)
        samples.append(Sample(scores, rank, key is not None, f"xray\t{path.name}\t{key}"))
    return samples, unreadable


def evaluate(
    conn: psycopg.Connection,
    embedder: Embedder,
    labelled: Sequence[LabelledQuery],
    settings: Settings,
    *,
    tta: bool = False,
    unknown: Path | None = None,
) -> EvalReport:
    """Accuracy on labelled X-rays; with the model's calibration, how well its
    numbers hold on them (and on X-rays of implants not in the catalogue: unknown)."""
    model = search.catalogue_model(conn, embedder.model_id)
    index = _label_index(conn)
    orientations = search.ORIENTATIONS if tta else search.ORIENTATIONS[:1]
    by_path = {q.path: q for q in labelled}
    outcomes: list[Outcome] = []
    skipped: list[Outcome] = []
    samples: list[Sample] = []
    for path, vectors, error in _vectors(embedder, list(by_path), settings, tta):
        label = by_path[path].label
        expected = index.get(_normalise(label))
        if vectors is None or expected is None:
            reason = error or f"label {label!r} names no implant in the catalogue"
            skipped.append(Outcome(str(path), label, expected, None, [], reason))
            continue
        result = search.search_vectors(
            conn,
            model,
            vectors,
            k=DEPTH,
            ef_search=settings.ef_search,
            min_score=settings.min_score,
            orientations=orientations,
        )
        keys = [m.key for m in result.matches]
        rank = keys.index(expected) + 1 if expected in keys else None
        top = [(m.key, round(m.score, 4)) for m in result.matches[:3]]
        outcomes.append(Outcome(str(path), label, expected, rank, top))
        samples.append(Sample(tuple(m.score for m in result.matches), rank, True, str(path)))
    if not outcomes:
        raise NoLabelledQueries(
            "no query could be evaluated: " + "; ".join(f"{o.path}: {o.error}" for o in skipped[:3])
        )
    report = _report(model.model_id, tta, outcomes, skipped)
    outside = unknown_samples(conn, embedder, settings, unknown)[0] if unknown else []
    report.trust = calibrate.evaluation(
        calibrate.load(conn, model.model_id), samples, outside, model_id=model.model_id, tta=tta
    )
    return report


def _report(
    model_id: str, tta: bool, outcomes: list[Outcome], skipped: list[Outcome]
) -> EvalReport:
    n = len(outcomes)

    def within(k: int) -> float:
        return sum(1 for o in outcomes if o.rank is not None and o.rank <= k) / n

    failures = [o for o in outcomes if not o.correct]
    pairs = Counter((o.expected_key, o.top[0][0]) for o in failures if o.top)
    confused = [
        {"expected": expected, "predicted": predicted, "count": count}
        for (expected, predicted), count in pairs.most_common(10)
    ]

    def spread(scores: list[float]) -> list[float]:
        return [min(scores), float(np.median(scores)), max(scores)] if scores else []

    return EvalReport(
        model_id=model_id,
        tta=tta,
        queries=n,
        top1=within(1),
        top3=within(3),
        top5=within(5),
        mrr=sum(1 / o.rank for o in outcomes if o.rank) / n,
        confused=confused,
        failures=failures,
        skipped=skipped,
        scores_right=spread([o.top[0][1] for o in outcomes if o.correct]),
        scores_wrong=spread([o.top[0][1] for o in failures if o.top]),
    )


def evaluate_source(settings: Settings, source: Path, unknown: Path | None = None) -> EvalReport:
    """`raiox eval`: read the labelled queries, refuse a mismatched catalogue before
    loading the model, then evaluate."""
    labelled = labelled_queries(source)
    spec = embedding.ModelSpec.from_settings(settings)
    with db.connect(settings) as conn:
        db.check_schema(conn)
        search.catalogue_model(conn, embedding.model_id(spec))
        embedder = embedding.load_embedder(spec)
        return evaluate(conn, embedder, labelled, settings, tta=settings.tta, unknown=unknown)


# --- eval --confirmed: the answers raiox gave, against the dentists' confirmations ---


class NoConfirmations(RaioxError):
    """No finished analysis has a confirmation (within the filters)."""


@dataclass
class ConfirmedReport:
    """Real-world accuracy: the stored matches of confirmed analyses (what raiox
    answered then, whatever model it was) against the latest confirmation."""

    since: str | None
    client: str | None
    analyses: int  # confirmed as a catalogue implant: the ones the metrics count
    top1: float
    top3: float
    top5: float
    mrr: float
    depth: int  # fewest matches stored for an analysis: top-k beyond it counts as a miss
    not_in_catalogue: int  # confirmed "not in the catalogue": never right, listed apart
    models: dict[str, int] = field(default_factory=dict)
    confused: list[dict[str, Any]] = field(default_factory=list)
    by_month: list[dict[str, Any]] = field(default_factory=list)
    by_manufacturer: list[dict[str, Any]] = field(default_factory=list)
    # How often the best score was under --min-score ("no confident match"), when
    # raiox was right, when it was wrong, and when the implant is not in the catalogue.
    min_score: float = 0.0
    under_min_score: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores_right: list[float] = field(default_factory=list)
    scores_wrong: list[float] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Answers given with a calibration: their stored probability, set and flag against
    # the confirmations, overall ("all") and per month (calibrate.answered_by_month).
    trust: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accuracy(ranks: Sequence[int | None]) -> dict[str, float]:
    n = len(ranks)

    def within(k: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= k) / n if n else 0.0

    return {
        "top1": within(1),
        "top3": within(3),
        "top5": within(5),
        "mrr": sum(1 / r for r in ranks if r) / n if n else 0.0,
    }


def _groups(rows: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    found: dict[str, list[int | None]] = {}
    for row in rows:
        found.setdefault(row[by], []).append(row["rank"])
    return [
        {by: name, "analyses": len(ranks), **_accuracy(ranks)}
        for name, ranks in sorted(found.items())
    ]


def _under(scores: Sequence[float | None], min_score: float) -> dict[str, Any]:
    known = [s for s in scores if s is not None]
    below = sum(1 for s in known if s < min_score)
    return {"under": below, "of": len(known), "rate": below / len(known) if known else None}


def evaluate_confirmed(
    conn: psycopg.Connection,
    *,
    since: datetime | None = None,
    client: str | None = None,
    min_score: float = 0.8,
) -> ConfirmedReport:
    """Top-1/3/5, MRR, confusions, per month and manufacturer, and the --min-score
    check, of the answers raiox gave to confirmed analyses."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    rows = []
    outside: list[float | None] = []
    models: Counter[str] = Counter()
    for row in queries.confirmed_outcomes(conn, since=since, client=client):
        top = row["scores"][0] if row["scores"] else None
        if row["not_in_catalogue"]:
            outside.append(top)
            continue
        ranked = list(row["ranked"])
        key = row["implant_key"]
        rank = ranked.index(key) + 1 if key in ranked else None
        models[row["model_id"] or "unknown"] += 1
        rows.append({**row, "rank": rank, "top": top, "first": ranked[0] if ranked else None})
    if not rows and not outside:
        where = f" since {since:%Y-%m-%d}" if since else ""
        where += f" from client {client!r}" if client else ""
        raise NoConfirmations(
            f"no confirmed analysis{where}: confirm results with "
            '"raiox confirm ANALYSIS_ID IMPLANT_KEY" (or POST /analyses/{id}/feedback)'
        )
    right = [r for r in rows if r["rank"] == 1]
    wrong = [r for r in rows if r["rank"] != 1]
    pairs = Counter((r["implant_key"], r["first"]) for r in wrong if r["first"])

    def spread(scores: list[float]) -> list[float]:
        return [min(scores), float(np.median(scores)), max(scores)] if scores else []

    answered = queries.confirmed_trust(conn, since=since, client=client)
    return ConfirmedReport(
        trust=calibrate.answered_by_month(answered) if answered else None,
        since=since.isoformat() if since else None,
        client=client,
        analyses=len(rows),
        **_accuracy([r["rank"] for r in rows]),
        depth=min((len(r["ranked"]) for r in rows), default=0),
        not_in_catalogue=len(outside),
        models=dict(models),
        confused=[
            {"expected": expected, "predicted": predicted, "count": count}
            for (expected, predicted), count in pairs.most_common(10)
        ],
        by_month=_groups(rows, "month"),
        by_manufacturer=_groups(rows, "manufacturer"),
        min_score=min_score,
        under_min_score={
            "right": _under([r["top"] for r in right], min_score),
            "wrong": _under([r["top"] for r in wrong], min_score),
            "not_in_catalogue": _under(outside, min_score),
        },
        scores_right=spread([r["top"] for r in right if r["top"] is not None]),
        scores_wrong=spread([r["top"] for r in wrong if r["top"] is not None]),
        failures=[
            {
                "analysis_id": str(r["public_id"]),
                "expected_key": r["implant_key"],
                "rank": r["rank"],
                "ranked_first": r["first"],
                "score": r["top"],
                "month": r["month"],
            }
            for r in wrong
        ],
    )


def evaluate_confirmed_source(
    settings: Settings, *, since: datetime | None = None, client: str | None = None
) -> ConfirmedReport:
    """`raiox eval --confirmed`: needs the database only, never the model."""
    with db.connect(settings) as conn:
        db.check_schema(conn)
        return evaluate_confirmed(conn, since=since, client=client, min_score=settings.min_score)
