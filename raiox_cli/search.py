"""Query embedding -> nearest images -> distinct implants, ranked."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psycopg

from raiox_cli import queries
from raiox_cli.embedding import Embedder
from raiox_cli.errors import EmptyCatalogue, ModelMismatch
from raiox_cli.images import LoadedImage

# Neighbours fetched per wanted implant: many images per implant is the normal case.
CANDIDATES_PER_IMPLANT = 20
MIN_CANDIDATES = 100


@dataclass(frozen=True)
class Match:
    rank: int
    implant_id: int
    key: str
    name: str
    manufacturer: str
    system: str | None
    diameter_mm: float | None
    length_mm: float | None
    connection: str | None
    image_id: int
    storage_key: str | None
    source_path: str | None
    score: float
    margin: float | None  # score minus the next implant's score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    model_id: str
    matches: list[Match]
    min_score: float

    @property
    def confident(self) -> bool:
        return bool(self.matches) and self.matches[0].score >= self.min_score


def catalogue_model(conn: psycopg.Connection, wanted_model_id: str) -> queries.ModelRow:
    """The active catalogue model, refusing a query embedded with another model."""
    model = queries.active_model(conn)
    if model is None or queries.count_embeddings(conn, model.model_id) == 0:
        raise EmptyCatalogue('the catalogue is empty; run "raiox ingest PATH" first')
    if model.model_id != wanted_model_id:
        name, _, pretrained = model.model_id.partition(":")
        raise ModelMismatch(
            f"model {wanted_model_id} differs from the catalogue's {model.model_id}; search with "
            f'--model {name} --pretrained {pretrained} or run "raiox reindex --model ..."'
        )
    return model


def search_vector(
    conn: psycopg.Connection,
    model: queries.ModelRow,
    vector: np.ndarray,
    *,
    k: int = 3,
    manufacturer: str | None = None,
    ef_search: int = 100,
    min_score: float = 0.8,
) -> SearchResult:
    candidates = max(MIN_CANDIDATES, k * CANDIDATES_PER_IMPLANT)
    queries.set_ef_search(conn, max(ef_search, candidates))
    rows = queries.nearest_implants(
        conn, model, vector, k=k, candidates=candidates, manufacturer=manufacturer
    )
    matches = []
    for rank, row in enumerate(rows, start=1):
        following = rows[rank]["score"] if rank < len(rows) else None
        margin = None if following is None else float(row["score"] - following)
        matches.append(
            Match(
                rank=rank,
                implant_id=row["id"],
                key=row["key"],
                name=row["name"],
                manufacturer=row["manufacturer"],
                system=row["system"],
                diameter_mm=row["diameter_mm"],
                length_mm=row["length_mm"],
                connection=row["connection"],
                image_id=row["image_id"],
                storage_key=row["storage_key"],
                source_path=row["source_path"],
                score=float(row["score"]),
                margin=margin,
            )
        )
    return SearchResult(model.model_id, matches, min_score)


def search_image(
    conn: psycopg.Connection,
    embedder: Embedder,
    image: LoadedImage,
    *,
    k: int = 3,
    manufacturer: str | None = None,
    ef_search: int = 100,
    min_score: float = 0.8,
) -> SearchResult:
    """The top k distinct implants for one radiograph."""
    model = catalogue_model(conn, embedder.model_id)
    vector = embedder.embed_images([image.image])[0]
    return search_vector(
        conn,
        model,
        vector,
        k=k,
        manufacturer=manufacturer,
        ef_search=ef_search,
        min_score=min_score,
    )
