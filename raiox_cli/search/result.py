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
class Trust:
    """What an answer says about itself; every surface shows these fields as they are."""

    calibrated: bool
    verdict: str  # one of VERDICTS
    probability: float | None = None  # that the top answer is right
    prediction_set: list[str] = field(default_factory=list)  # implant keys, best first
    set_coverage: float | None = None  # the target the set was built for
    out_of_catalogue: bool | None = None
    out_of_catalogue_score: float | None = None  # 1 - p-value: higher, more likely outside
    reason: str | None = None  # why not calibrated
    calibration_id: int | None = None
    calibrated_at: str | None = None
    ranked: list[list[Any]] = field(default_factory=list)  # [key, score] the numbers came from

    def to_dict(self, *, stored: bool = False) -> dict[str, Any]:
        """The answer's fields; `stored` adds the ranked scores (kept with an analysis
        so a confirmation of it can recalibrate later)."""
        data = asdict(self)
        if not stored:
            del data["ranked"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Trust | None:
        if not data:
            return None
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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
    trust: Trust | None = None  # probability, prediction set, out of catalogue (calibrate.py)

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
