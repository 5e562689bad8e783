"""Query embedding -> nearest images -> distinct implants, ranked.

Several images of one implant must never fill the top k. The nearest-image scan
goes through the model's HNSW index with pgvector's iterative scan, so a LIMIT
larger than ef_search is honoured; when the first batch of candidates holds fewer
than k implants the batch grows (x4), and when the index runs out before k
implants although the catalogue has them, an exact scan answers instead.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from PIL import Image

from raiox_cli import images
from raiox_cli.catalogue import pipeline
from raiox_cli.catalogue.pipeline import ORIENTATIONS
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.embedding import Embedder, parse_model_id
from raiox_cli.errors import EmptyCatalogue, ModelMismatch, UnreadableQuery
from raiox_cli.images import Crop, LoadedImage
from raiox_cli.search import calibrate, sheet
from raiox_cli.search.rank import rank
from raiox_cli.search.result import CONFIDENCE, Match, SearchResult, confidence
from raiox_cli.store import objects as storage
from raiox_cli.store.objects import Store

# Match, SearchResult and confidence are also named here for the modules that know
# them as search.Match, search.confidence (the server, catalogue.demo)
__all__ = ["CONFIDENCE", "Match", "SearchResult", "confidence", "rank"]

log = logging.getLogger(__name__)

# First batch of nearest images: 20 per wanted implant, at least 100. On the 100k
# benchmark (50 images per implant) a first batch of 40 had to grow so often that
# it was slower than 100 (bench/README.md).
CANDIDATES_PER_IMPLANT = 20
MIN_CANDIDATES = 100
MAX_CANDIDATES = 6400  # 100 -> 400 -> 1600 -> 6400, then the exact scan
MAX_SCAN_TUPLES = 20_000  # pgvector's default bound on one iterative scan
# --manufacturer: index rows an iterative scan may visit per candidate wanted. On the
# 100k benchmark a query showing that manufacturer's implant stays far below it; one
# showing another's walked the graph far and got recall 0.44 (exact: 1.0).
FILTER_SCAN_FACTOR = 10
HNSW_MAX_EF_SEARCH = 1000  # pgvector's limit, the most a non-iterative scan returns

# On by default (settings.tta): on synthetic data an upside-down copy of a catalogue
# image ranked its implant first 62.5% of the time without, 100% with (docs/guides/searching.md).
DEFAULT_TTA = True


def catalogue_model(conn: psycopg.Connection, wanted_model_id: str) -> queries.ModelRow:
    """The active catalogue model, refusing a query embedded with another model."""
    model = queries.active_model(conn)
    if model is None or not queries.model_has_embeddings(conn, model.model_id):
        raise EmptyCatalogue('the catalogue is empty; run "raiox ingest PATH" first')
    if model.model_id != wanted_model_id:
        theirs, ours = parse_model_id(model.model_id), parse_model_id(wanted_model_id)
        if (theirs.name, theirs.tag) == (ours.name, ours.tag):  # the same model, in int8 or not
            raise ModelMismatch(
                f"model {wanted_model_id} differs from the catalogue's {model.model_id} in "
                f"precision; search with RAIOX_PRECISION={theirs.precision} or run "
                f'"raiox reindex --precision {ours.precision}"'
            )
        raise ModelMismatch(
            f"model {wanted_model_id} differs from the catalogue's {model.model_id}; search with "
            f'--model {theirs.name} --pretrained {theirs.tag} or run "raiox reindex --model ..."'
        )
    return model


@dataclass
class _Session:
    """The search settings sent in the current transaction (or session, when the
    connection autocommits: there a transaction lasts one statement)."""

    ef_search: int
    iterative: bool
    scan_bound: int
    local: bool


# Per connection: whether the server has pgvector's iterative scans (asked once).
_configured: weakref.WeakKeyDictionary[psycopg.Connection, bool] = weakref.WeakKeyDictionary()


def _configure(conn: psycopg.Connection, ef_search: int) -> _Session:
    iterative = _configured.get(conn)
    if iterative is None:
        iterative = _configured[conn] = queries.iterative_scan_supported(conn)
    local = not conn.autocommit
    queries.configure_search(
        conn,
        ef_search=ef_search,
        iterative=iterative,
        max_scan_tuples=MAX_SCAN_TUPLES,
        local=local,
    )
    return _Session(ef_search, iterative, MAX_SCAN_TUPLES, local)


def _bound_scan(conn: psycopg.Connection, session: _Session, bound: int) -> None:
    if session.iterative and session.scan_bound != bound:
        queries.set_max_scan_tuples(conn, bound, local=session.local)
        session.scan_bound = bound


def nearest_implant_rows(
    conn: psycopg.Connection,
    model: queries.ModelRow,
    vector: np.ndarray,
    *,
    k: int,
    manufacturer: str | None = None,
    ef_search: int = 100,
) -> tuple[list[dict[str, Any]], bool]:
    """The k nearest distinct implants (rows, best first) and whether the exact scan
    answered. Returns k rows whenever the catalogue (or manufacturer) has k implants."""
    session = _configure(conn, ef_search)
    iterative = session.iterative
    candidates = max(MIN_CANDIDATES, k * CANDIDATES_PER_IMPLANT)
    while True:
        if not iterative:
            # Without iterative scans an HNSW scan stops after ef_search rows.
            if candidates > HNSW_MAX_EF_SEARCH:
                break
            queries.set_ef_search(conn, max(ef_search, candidates), local=session.local)
        # A filtered scan that needs more than FILTER_SCAN_FACTOR rows per match has
        # wandered away from the query: there the exact scan is faster and right.
        _bound_scan(
            conn, session, FILTER_SCAN_FACTOR * candidates if manufacturer else MAX_SCAN_TUPLES
        )
        rows, fetched = queries.nearest_implants(
            conn, model, vector, k=k, candidates=candidates, manufacturer=manufacturer
        )
        # A filtered scan that stopped at its bound saw only part of that maker's
        # images: its k implants are a guess (recall 0.89 on the benchmark), so the
        # exact scan answers instead.
        truncated = manufacturer is not None and fetched < candidates
        if len(rows) >= k and not truncated:
            return rows, False
        if fetched < candidates or candidates >= MAX_CANDIDATES:
            break  # the index had no more (or the scan hit its bound)
        candidates *= 4
    if not iterative:
        queries.set_ef_search(conn, ef_search, local=session.local)
    # Both statements below read every row: there a sequential scan is right. (On
    # an error the transaction's rollback undoes the setting.)
    queries.allow_seqscan(conn, True, local=session.local)
    exact: list[dict[str, Any]] | None = None
    if queries.count_searchable_implants(conn, model, manufacturer) > len(rows):
        exact = queries.exact_nearest_implants(conn, model, vector, k=k, manufacturer=manufacturer)
    queries.allow_seqscan(conn, False, local=session.local)
    return (rows, False) if exact is None else (exact, True)


def nearest_implant_rows_many(
    conn: psycopg.Connection,
    model: queries.ModelRow,
    vectors: np.ndarray,
    *,
    k: int,
    manufacturer: str | None = None,
    ef_search: int = 100,
) -> list[tuple[list[dict[str, Any]], bool]]:
    """`nearest_implant_rows` for many query vectors, with the same rules: each round
    asks every still-open query in ONE statement (queries.nearest_implants_many), a
    query that needs more candidates goes on to the next round with 4x, and one whose
    index scan ran out is answered by the exact scan."""
    session = _configure(conn, ef_search)
    iterative = session.iterative
    answers: list[tuple[list[dict[str, Any]], bool]] = [([], False)] * len(vectors)
    last: dict[int, list[dict[str, Any]]] = {}
    pending = list(range(len(vectors)))
    exact_needed: list[int] = []
    candidates = max(MIN_CANDIDATES, k * CANDIDATES_PER_IMPLANT)
    while pending:
        if not iterative:
            if candidates > HNSW_MAX_EF_SEARCH:
                exact_needed += pending
                break
            queries.set_ef_search(conn, max(ef_search, candidates), local=session.local)
        _bound_scan(
            conn, session, FILTER_SCAN_FACTOR * candidates if manufacturer else MAX_SCAN_TUPLES
        )
        found = queries.nearest_implants_many(
            conn, model, vectors[pending], k=k, candidates=candidates, manufacturer=manufacturer
        )
        going_on = []
        for index, (rows, fetched) in zip(pending, found, strict=True):
            truncated = manufacturer is not None and fetched < candidates
            if len(rows) >= k and not truncated:
                answers[index] = (rows, False)
            elif fetched < candidates or candidates >= MAX_CANDIDATES:
                last[index] = rows
                exact_needed.append(index)
            else:
                going_on.append(index)
        pending = going_on
        candidates *= 4
    if exact_needed:
        if not iterative:
            queries.set_ef_search(conn, ef_search, local=session.local)
        queries.allow_seqscan(conn, True, local=session.local)
        searchable = queries.count_searchable_implants(conn, model, manufacturer)
        for index in exact_needed:
            rows = last.get(index, [])
            if searchable > len(rows):
                exact = queries.exact_nearest_implants(
                    conn, model, vectors[index], k=k, manufacturer=manufacturer
                )
                answers[index] = (exact, True)
            else:
                answers[index] = (rows, False)
        queries.allow_seqscan(conn, False, local=session.local)
    return answers


def search_vectors(
    conn: psycopg.Connection,
    model: queries.ModelRow,
    vectors: np.ndarray,
    *,
    k: int = 3,
    manufacturer: str | None = None,
    ef_search: int = 100,
    min_score: float = 0.8,
    orientations: Sequence[str] = ("original",),
    min_margin: float = 0.02,
) -> SearchResult:
    """Top k distinct implants for one query given as one vector per orientation;
    each implant scores its best over the orientations. One more implant than asked
    is fetched so the last match has a margin too, and at least calibrate.DEPTH so
    the answer's trust fields see the implants a prediction set may hold."""
    vectors = np.atleast_2d(vectors)
    calibration = calibrate.load(conn, model.model_id)
    depth = ranked_depth(model, k)
    found = []
    for vector in vectors:
        found.append(
            nearest_implant_rows(
                conn, model, vector, k=depth + 1, manufacturer=manufacturer, ef_search=ef_search
            )
        )
    result = rank(model, found, orientations, k=depth, min_score=min_score)
    return with_trust(
        result, calibration, k=k, filtered=manufacturer is not None, min_margin=min_margin
    )


def ranked_depth(model: queries.ModelRow, k: int) -> int:
    """Implants ranked per query: k, or calibrate.DEPTH for the trust fields (not
    for random weights, which are never calibrated)."""
    return k if calibrate.random_weights(model.model_id) else max(k, calibrate.DEPTH)


def with_trust(
    result: SearchResult,
    calibration: calibrate.Calibration | None,
    *,
    k: int,
    filtered: bool,
    min_margin: float,
) -> SearchResult:
    """The answer's trust fields from its whole ranked list, then its top k."""
    trust = calibrate.trust_for(
        calibration,
        [(m.key, m.score) for m in result.matches],
        model_id=result.model_id,
        tta=len(result.orientations) > 1,
        filtered=filtered,
        min_score=result.min_score,
        min_margin=min_margin,
    )
    return replace(result, matches=result.matches[:k], trust=trust)


def search_many_vectors(
    conn: psycopg.Connection,
    model: queries.ModelRow,
    queries_vectors: Sequence[np.ndarray],
    orientations: Sequence[Sequence[str]],
    *,
    k: int = 3,
    manufacturer: str | None = None,
    ef_search: int = 100,
    min_score: float = 0.8,
    min_margin: float = 0.02,
) -> list[SearchResult]:
    """`search_vectors` for many X-rays (each one vector per orientation): every
    orientation of every X-ray goes to the database together."""
    stacked = [np.atleast_2d(v) for v in queries_vectors]
    if not stacked:
        return []
    calibration = calibrate.load(conn, model.model_id)
    depth = ranked_depth(model, k)
    found = nearest_implant_rows_many(
        conn,
        model,
        np.concatenate(stacked),
        k=depth + 1,
        manufacturer=manufacturer,
        ef_search=ef_search,
    )
    results, start = [], 0
    for vectors, views in zip(stacked, orientations, strict=True):
        part = found[start : start + len(vectors)]
        ranked = rank(model, part, views, k=depth, min_score=min_score)
        filtered = manufacturer is not None
        results.append(
            with_trust(ranked, calibration, k=k, filtered=filtered, min_margin=min_margin)
        )
        start += len(vectors)
    return results


def oriented(image: Image.Image, tta: bool) -> tuple[list[Image.Image], tuple[str, ...]]:
    """The query image, plus its mirrored and upside-down versions with tta."""
    views = ORIENTATIONS if tta else ORIENTATIONS[:1]
    return pipeline.oriented(image, views), views


def search_image(
    conn: psycopg.Connection,
    embedder: Embedder,
    image: LoadedImage,
    *,
    k: int = 3,
    manufacturer: str | None = None,
    ef_search: int = 100,
    min_score: float = 0.8,
    tta: bool = DEFAULT_TTA,
    min_margin: float = 0.02,
) -> SearchResult:
    """The top k distinct implants for one radiograph (crop already applied)."""
    model = catalogue_model(conn, embedder.model_id)
    orientations = ORIENTATIONS if tta else ORIENTATIONS[:1]
    vectors = embedder.embed_tensors(
        pipeline.views_of(image.image, embedder.preprocessor, orientations)
    )
    result = search_vectors(
        conn,
        model,
        vectors,
        k=k,
        manufacturer=manufacturer,
        ef_search=ef_search,
        min_score=min_score,
        orientations=orientations,
        min_margin=min_margin,
    )
    notes = result_notes(result, manufacturer=manufacturer)
    return replace(result, crop_box=image.crop_box, notes=notes)


def result_notes(result: SearchResult, *, manufacturer: str | None) -> list[str]:
    """What the CLI warns about under the table (random weights: embedding says it)."""
    notes = []
    if not result.matches and manufacturer:
        notes.append(f"no implant of manufacturer {manufacturer!r} in the catalogue")
    return notes


def stored_trust(result: SearchResult) -> dict[str, Any] | None:
    """What an analysis keeps of the answer's trust fields (with the ranked scores)."""
    return result.trust.to_dict(stored=True) if result.trust is not None else None


def result_json(query: str, k: int, result: SearchResult) -> dict[str, Any]:
    """`raiox search --json`: one X-ray's answer (schema in docs/guides/searching.md)."""
    return {
        "query": query,
        "model_id": result.model_id,
        "k": k,
        "crop": list(result.crop_box) if result.crop_box else None,
        "tta": len(result.orientations) > 1,
        "orientations": list(result.orientations),
        "confident": result.confident,
        "min_score": result.min_score,
        "exact": result.exact,
        "analysis_id": result.analysis_id,
        "matches": [m.to_dict() for m in result.matches],
        "trust": result.trust.to_dict() if result.trust is not None else None,
    }


def load_query(
    path: Path, settings: Settings, crop: Crop | None = None, data: bytes | None = None
) -> LoadedImage:
    """Decode the query radiograph (crop applied), or say in one line why not.
    `data`: the file's bytes when the caller has read them already."""
    try:
        return images.load_image(
            path if data is None else data,
            max_pixels=settings.max_pixels,
            max_bytes=settings.max_bytes,
            crop=crop,
        )
    except images.ImageError as exc:
        raise UnreadableQuery(f"{path}: {exc}") from exc


def read_query(path: Path, settings: Settings) -> bytes:
    try:
        return images.read_bytes(path, settings.max_bytes)
    except images.ImageError as exc:
        raise UnreadableQuery(f"{path}: {exc}") from exc


def reference_image(match: Match, store: Store | None) -> Image.Image | None:
    """A match's reference image: from the catalogue folder, else from storage."""
    try:
        if match.image_path and Path(match.image_path).is_file():
            return images.load_image(Path(match.image_path)).image
        if match.storage_key and store is not None:
            return images.load_image(store.get(match.storage_key)).image
    except Exception as exc:  # a missing picture must not lose the answer
        log.warning("reference image of %s unavailable: %s", match.key, exc)
    return None


def write_contact_sheet(
    settings: Settings, query_path: Path, data: bytes, result: SearchResult, out: Path
) -> Path:
    """The query (uncropped, crop box drawn) beside the matches' reference images."""
    original = load_query(query_path, settings, data=data).image
    try:
        store: Store | None = storage.open_store(settings)
    except Exception as exc:  # storage is optional for a sheet: folders may do
        log.warning("image storage unavailable (%s); using catalogue folders only", exc)
        store = None
    return sheet.write_sheet(
        out,
        original,
        result,
        lambda match: reference_image(match, store),
        query_name=query_path.name,
        lang=settings.default_lang,  # RAIOX_LANG: a sheet is read like a page
    )
