"""Ranking: the nearest images of each query orientation -> distinct implants, best first."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raiox_cli.catalogue.scan import open_root
from raiox_cli.db import queries
from raiox_cli.search.result import Match, SearchResult


def _image_path(row: dict[str, Any]) -> str | None:
    if not row["source_path"]:
        return None
    if row["root_path"]:
        return open_root(row["root_path"]).location(row["source_path"])
    return row["source_path"] if Path(row["source_path"]).is_absolute() else None


def rank(
    model: queries.ModelRow,
    found: Sequence[tuple[list[dict[str, Any]], bool]],
    orientations: Sequence[str],
    *,
    k: int,
    min_score: float,
) -> SearchResult:
    """One X-ray's answer from the nearest implants of each of its orientations:
    each implant keeps its best score (and the orientation that gave it)."""
    best: dict[int, tuple[dict[str, Any], str]] = {}
    exact = False
    for (rows, used_exact), orientation in zip(found, orientations, strict=True):
        exact = exact or used_exact
        for row in rows:
            held = best.get(row["id"])
            if held is None or row["score"] > held[0]["score"]:
                best[row["id"]] = (row, orientation)
    # An implant in the merged top k is in the top k of the orientation that gave
    # its score, so merging per-orientation top lists is exact.
    ranked = sorted(best.values(), key=lambda item: (-item[0]["score"], item[0]["id"]))
    matches = []
    for place, (row, orientation) in enumerate(ranked[:k], start=1):
        following = ranked[place][0]["score"] if place < len(ranked) else None
        matches.append(
            Match(
                rank=place,
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
                image_path=_image_path(row),
                score=float(row["score"]),
                margin=None if following is None else float(row["score"] - following),
                orientation=orientation,
            )
        )
    return SearchResult(model.model_id, matches, min_score, tuple(orientations), exact=exact)
