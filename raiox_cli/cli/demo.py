"""raiox demo: a new user's first command, end to end on a synthetic catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import MODEL, settings
from raiox_cli.cli.render import note, print_eval, print_matches, say

app = group()


@command(app, "demo")
@settings(*MODEL)
def demo(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="demo folder [default: RAIOX_HOME/demo]", show_default=False),
    ] = None,
    systems: Annotated[int, typer.Option(min=2, max=200, help="synthetic implant systems")] = 8,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta", help="search in three orientations [default on]", show_default=False
        ),
    ] = None,
    rendered: Annotated[
        bool,
        typer.Option(
            "--render",
            help="a catalogue rendered from 3D implant models (raiox render), tilted queries",
        ),
    ] = False,
    *,
    settings: config.Settings,
) -> None:
    """Try raiox end to end on a synthetic catalogue: generate, ingest, search, eval.

    Writes implant radiographs and labelled queries under RAIOX_HOME/demo (or
    --out), ingests them into the database (the embedded one by default),
    prints a few searches, writes a contact sheet and evaluates the queries. A
    second run reuses everything. Offline without model weights, run it with
    --pretrained none (random weights: a smoke run, scores meaningless) or set
    RAIOX_WEIGHTS to a local checkpoint. With --render (under RAIOX_HOME/demo-render)
    the catalogue is rendered from the implants' 3D models, and views-sheet.png shows
    one implant drawn three ways and some of its rendered views.

    Example: raiox demo --pretrained none
    """
    # lazy: start-up time
    from raiox_cli.catalogue import demo as core

    _print_demo(core.run_demo(settings, out_dir, systems=systems, rendered=rendered))


def _print_demo(report: Any) -> None:
    made = "generated" if report.generated else "reused"
    i = report.ingest
    note(f"synthetic catalogue {made} in {report.folder}")
    note(
        f"ingest: {i.new} new, {i.updated} updated, {i.unchanged} unchanged images "
        f"({report.model_id})"
    )
    for searched in report.searches:  # each query by its own path: they share file names
        query = searched.query.relative_to(report.folder / "queries")
        print_matches(f"{query}: should be {searched.expected_key}", searched.result)
    if report.sheet is not None:
        say(f"contact sheet: {report.sheet}")
    if report.views_sheet is not None:
        say(f"rendered views: {report.views_sheet} (catalogue in {report.folder / 'catalogue'})")
    if report.evaluation is not None:
        print_eval(report.evaluation, details=False)  # failures: raiox eval QUERIES
    catalogue = report.folder / "catalogue"
    say(
        "\nWhat to do next:\n"
        f"  look at {report.sheet or catalogue}, and the demo catalogue in {catalogue}\n"
        "  ingest your own: raiox ingest /path/to/catalogue  (<Manufacturer>/<Implant>/images,"
        " optional catalogue.csv)\n"
        "  identify an X-ray: raiox search xray.jpg --crop x,y,w,h --sheet sheet.png\n"
        f"  every failure of this eval: raiox eval {report.folder / 'queries'}\n"
        "  measure yours: raiox eval /path/to/labelled-xrays\n"
        "  real weights offline: RAIOX_WEIGHTS=/path/open_clip_model.safetensors"
        " (docs/guides/backends.md)"
    )
