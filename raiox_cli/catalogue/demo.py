"""`raiox demo`: a new user's first run, end to end, on the embedded database.

Generates a synthetic catalogue and labelled queries (synth.py), ingests them,
searches a few queries (the first with a contact sheet), and evaluates the query
set. Idempotent: a second run reuses the generated files and the ingested catalogue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from raiox_cli import db, embedding
from raiox_cli.catalogue import ingest
from raiox_cli.config import Settings
from raiox_cli.errors import ModelUnavailable
from raiox_cli.search import evaluate
from raiox_cli.search import query as search
from raiox_cli.training import synth

SEARCHED = 3  # queries shown as result tables


@dataclass(frozen=True)
class DemoSearch:
    query: Path
    expected_key: str
    result: search.SearchResult


@dataclass
class DemoReport:
    folder: Path
    model_id: str
    meaningless: bool  # random weights: the scores say nothing about implants
    generated: bool  # False: the synthetic files were already there
    ingest: ingest.IngestReport
    searches: list[DemoSearch] = field(default_factory=list)
    sheet: Path | None = None
    evaluation: evaluate.EvalReport | None = None


def _layout(folder: Path, recipe: dict[str, int]) -> synth.SynthInfo:
    """Where make_catalogue puts each file of this recipe (without drawing)."""
    catalogue, queries_dir = folder / "catalogue", folder / "queries"
    implants = []
    for d in synth.design_systems(recipe["systems"], recipe["seed"]):
        home = catalogue / d.manufacturer / d.name
        asked = queries_dir / d.manufacturer / d.name
        views = [home / f"view_{v:02d}.png" for v in range(recipe["views"])]
        queries = [asked / f"q_{q:02d}.png" for q in range(recipe["queries"])]
        implants.append(synth.SynthImplant(d, d.key, home, views, queries))
    return synth.SynthInfo(folder, catalogue, queries_dir, catalogue / "catalogue.csv", implants)


def synthesize(folder: Path, recipe: dict[str, int]) -> tuple[synth.SynthInfo, bool]:
    """The synthetic catalogue, drawn only when missing. The recipe marker is
    written last, so an interrupted run draws again."""
    marker = folder / "demo.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == recipe:
        info = _layout(folder, recipe)
        if all(p.is_file() for p in [*info.catalogue_files, *info.query_files, info.csv]):
            return info, False
    info = synth.make_catalogue(folder, **recipe)
    marker.write_text(json.dumps(recipe), encoding="utf-8")
    return info, True


def run_demo(
    settings: Settings,
    folder: Path | None = None,
    *,
    systems: int = 8,
    views: int = 4,
    queries: int = 2,
) -> DemoReport:
    """Generate, ingest, search, draw a contact sheet, evaluate."""
    spec = embedding.ModelSpec.from_settings(settings)
    try:  # first, so an offline machine without weights stops within seconds
        embedder = embedding.load_embedder(spec)
    except ModelUnavailable as exc:
        raise ModelUnavailable(
            f"{exc}. For a smoke run of the demo: raiox demo --pretrained none"
        ) from exc
    folder = folder or settings.home / "demo"
    recipe = {"systems": systems, "views": views, "queries": queries, "seed": 0}
    info, generated = synthesize(folder, recipe)
    db.migrate(settings)
    ingested = ingest.ingest_catalogue(settings, info.catalogue)
    report = DemoReport(folder, embedder.model_id, embedder.meaningless, generated, ingested)
    sheet = folder / "contact-sheet.png"
    for n, implant in enumerate([i for i in info.implants if i.queries][:SEARCHED]):
        result = search.search_file(
            settings, implant.queries[0], k=3, sheet_path=sheet if n == 0 else None
        )
        report.searches.append(DemoSearch(implant.queries[0], implant.key, result))
    report.sheet = sheet if report.searches else None
    if info.query_files:
        report.evaluation = evaluate.evaluate_source(settings, info.queries_dir)
    return report
