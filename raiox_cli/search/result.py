"""What a search answers: ranked implants (Match) and one X-ray's result (SearchResult).

These types sit below every module that makes, stores or draws a result (query,
batch, sheet, the server), so none of those needs another to name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


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
    image_path: str | None  # the reference image on disk, when its catalogue root is known
    score: float  # cosine similarity of the best image, 1 = identical embedding
    margin: float | None  # score minus the next implant's score
    orientation: str = "original"  # which query orientation gave the score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    model_id: str
    matches: list[Match]
    min_score: float
    orientations: tuple[str, ...] = ("original",)
    analysis_id: int | None = None
    exact: bool = False  # answered by the exact scan (the index ran out)
    crop_box: tuple[int, int, int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def confident(self) -> bool:
        return bool(self.matches) and self.matches[0].score >= self.min_score


CONFIDENCE = ("strong", "possible", "none")


def confidence(scores: Sequence[float], min_score: float, min_margin: float) -> str:
    """Plain-language confidence of a ranked result: "strong" when the best score
    reaches min_score and leads the next implant by min_margin, "possible" when it
    reaches min_score only, "none" below it (or with no match at all)."""
    if not scores or scores[0] < min_score:
        return "none"
    if len(scores) > 1 and scores[0] - scores[1] < min_margin:
        return "possible"
    return "strong"
