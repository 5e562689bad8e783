"""`raiox demo`: a new user's first run, end to end, on the embedded database.

Generates a synthetic catalogue and labelled queries (synth.py), ingests them,
searches a few queries (the first with a contact sheet), and evaluates the query
set. Idempotent: a second run reuses the generated files and the ingested catalogue.
With `render`, the catalogue is rendered from the implants' 3D models instead
(synth3d.py -> render.py), the queries are noisy tilted renders, and a second sheet
shows one implant drawn three ways and a choice of its views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from raiox_cli import analyses, db, embedding
from raiox_cli.catalogue import ingest, render
from raiox_cli.config import Settings
from raiox_cli.errors import ModelUnavailable
from raiox_cli.search import evaluate, sheet
from raiox_cli.search import query as search
from raiox_cli.training import synth, synth3d

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
    views_sheet: Path | None = None  # --render: one implant three ways + its views


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


RENDER_VIEWS = (8, 2)  # turns x tilts for the demo: 32 images per implant with mirrors
SHOWN_VIEWS = 6


def synthesize_rendered(
    folder: Path, recipe: dict[str, int], settings: render.RenderSettings
) -> tuple[synth.SynthInfo, bool]:
    """The 3D models, their rendered catalogue and query renders, each made only when
    missing (the render itself is incremental)."""
    designs = synth.design_systems(recipe["systems"], recipe["seed"])
    models = folder / "models"
    marker = folder / "demo.json"
    reuse = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == recipe
    if not reuse:
        synth3d.write_models(models, designs)
    catalogue, queries_dir = folder / "catalogue", folder / "queries"
    report = render.render_catalogue([models], catalogue, settings)
    implants = []
    for d in designs:
        home = catalogue / d.manufacturer / d.name
        asked = queries_dir / d.manufacturer / d.name
        asked.mkdir(parents=True, exist_ok=True)
        queries = [asked / f"q_{q:02d}.png" for q in range(recipe["queries"])]
        for q, path in enumerate(queries):
            if not (reuse and path.is_file()):
                synth3d.query_render(d, seed=recipe["seed"], index=q).save(path)
        views = sorted(home.glob("rot*.png"))
        implants.append(synth.SynthImplant(d, d.key, home, views, queries))
    marker.write_text(json.dumps(recipe), encoding="utf-8")
    generated = not reuse or any(o.status == "rendered" for o in report.outcomes)
    return (
        synth.SynthInfo(folder, catalogue, queries_dir, catalogue / "catalogue.csv", implants),
        generated,
    )


def views_sheet(path: Path, implant: synth.SynthImplant) -> Path:
    """One implant as synth's 2D view, a clean render and a query render, then a few of
    its catalogue views: two rows of contact-sheet tiles."""
    flat, clean, query = synth3d.three_drawings(implant.design)
    rows = [
        sheet.render(
            sheet.Tile(flat, ("2D drawing", "synth.py", "")),
            [
                sheet.Tile(clean, ("clean render", "turn 0, tilt 0", "")),
                sheet.Tile(query, ("query render", "tilted, noisy, neighbours", "")),
            ],
            title=f"{implant.design.name}: one implant, three drawings",
        )
    ]
    step = max(1, len(implant.views) // SHOWN_VIEWS)
    shown = implant.views[::step][:SHOWN_VIEWS]
    if shown:
        tiles = []
        for view in shown:
            turn, tilt, mirrored = render.parse_view_name(view.name) or (0, 0, False)
            with Image.open(view) as img:
                tiles.append(
                    sheet.Tile(
                        img.copy(),
                        (f"turn {turn}, tilt {tilt}", "mirrored" if mirrored else "", ""),
                    )
                )
        rows.append(
            sheet.render(
                tiles[0], tiles[1:], title=f"{len(implant.views)} rendered catalogue views"
            )
        )
    width = max(r.width for r in rows)
    page = Image.new("RGB", (width, sum(r.height for r in rows)), sheet.BACKGROUND)
    top = 0
    for row in rows:
        page.paste(row, (0, top))
        top += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    page.save(path, format="PNG")
    return path


def run_demo(
    settings: Settings,
    folder: Path | None = None,
    *,
    systems: int = 8,
    views: int = 4,
    queries: int = 2,
    rendered: bool = False,
) -> DemoReport:
    """Generate (or render), ingest, search, draw a contact sheet, evaluate."""
    spec = embedding.ModelSpec.from_settings(settings)
    try:  # first, so an offline machine without weights stops within seconds
        embedder = embedding.load_embedder(spec)
    except ModelUnavailable as exc:
        raise ModelUnavailable(
            f"{exc}. For a smoke run of the demo: raiox demo --pretrained none"
        ) from exc
    folder = folder or settings.home / ("demo-render" if rendered else "demo")
    recipe = {"systems": systems, "views": views, "queries": queries, "seed": 0}
    if rendered:
        turns, tilts = RENDER_VIEWS
        look = render.RenderSettings(turns=turns, tilts=tilts, size=320)
        info, generated = synthesize_rendered(folder, {**recipe, "views": turns * tilts}, look)
    else:
        info, generated = synthesize(folder, recipe)
    db.migrate(settings)
    ingested = ingest.ingest_catalogue(settings, info.catalogue)
    report = DemoReport(folder, embedder.model_id, embedder.meaningless, generated, ingested)
    sheet_path = folder / "contact-sheet.png"
    for n, implant in enumerate([i for i in info.implants if i.queries][:SEARCHED]):
        result = analyses.search_file(
            settings, implant.queries[0], k=3, sheet_path=sheet_path if n == 0 else None
        )
        report.searches.append(DemoSearch(implant.queries[0], implant.key, result))
    report.sheet = sheet_path if report.searches else None
    if rendered and info.implants:
        report.views_sheet = views_sheet(folder / "views-sheet.png", info.implants[0])
    if info.query_files:
        report.evaluation = evaluate.evaluate_source(settings, info.queries_dir)
    return report
