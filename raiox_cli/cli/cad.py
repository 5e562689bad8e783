"""`raiox render`: implant CAD models (STL, OBJ, PLY) -> a catalogue of radiograph-like views."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, ShowProgress
from raiox_cli.cli.render import err, out, print_json, progress_bar
from raiox_cli.errors import UnusableModel

app = group()


@command(app, "render")
def render_models(
    models: Annotated[
        list[Path], typer.Argument(metavar="MODELS...", help="model files, or folders of them")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="the catalogue folder to write")],
    views: Annotated[
        str, typer.Option(help="TURNSxTILTS: turns about the long axis x tilts")
    ] = "12x3",
    max_tilt: Annotated[float, typer.Option(help="largest tilt toward the viewer (deg)")] = 20.0,
    material: Annotated[str, typer.Option(help="titanium or zirconia")] = "titanium",
    size: Annotated[int, typer.Option(help="image width and height (px)")] = 512,
    background: Annotated[str, typer.Option(help="plain or bone")] = "plain",
    axis: Annotated[
        str | None,
        typer.Option(help="apex-to-platform axis: x, -z, or 0,0,1 [default: principal axis]"),
    ] = None,
    scale: Annotated[float, typer.Option(help="model units to mm: 1000 for metres")] = 1.0,
    mirror: Annotated[bool, typer.Option("--mirror/--no-mirror", help="mirrored views")] = True,
    cone: Annotated[
        float | None,
        typer.Option(help="cone beam from a source this many mm away [default: parallel]"),
    ] = None,
    manufacturer: Annotated[str | None, typer.Option(help="for models without a row")] = None,
    system: Annotated[str | None, typer.Option(help="for models without a row")] = None,
    diameter: Annotated[float | None, typer.Option(help="diameter_mm, ditto")] = None,
    length: Annotated[float | None, typer.Option(help="length_mm, ditto")] = None,
    connection: Annotated[str | None, typer.Option(help="for models without a row")] = None,
    seed: Annotated[int, typer.Option(help="noise and background seed")] = 0,
    jobs: Annotated[
        int | None, typer.Option(min=1, help="worker processes [default: cores]")
    ] = None,
    force: Annotated[bool, typer.Option(help="draw again even when nothing changed")] = False,
    progress: ShowProgress = False,
    json_out: JsonOut = False,
) -> None:
    """Render implant models into an ordinary catalogue folder for `raiox ingest`.

    Each model (STL, OBJ or PLY, in millimetres) is projected as a radiograph at
    TURNS turns about its long axis x TILTS tilts toward the viewer, each also
    mirrored: OUT/<Manufacturer>/<Implant>/rot030_tilt10.png, with OUT/catalogue.csv.
    Metadata comes from a catalogue.csv beside the models (a `model` column naming
    the file, then name, manufacturer, system, diameter_mm, length_mm, connection,
    notes), else from the flags, else the file's stem names the implant. An
    unchanged model is skipped. A model that cannot be used (STEP, wrong units,
    open surface) is reported and skipped; the exit code is then 8.

    Example: raiox render implants/ --out renders --views 12x3 && raiox ingest renders
    """
    # lazy: start-up time
    from raiox_cli.catalogue import render as core

    turns, tilts = core.parse_views(views)
    settings = core.RenderSettings(
        turns=turns,
        tilts=tilts,
        max_tilt=max_tilt,
        mirror=mirror,
        size=size,
        material=material,
        background=background,
        seed=seed,
        scale=scale,
        axis=axis,
        source_mm=cone,
    )
    flags = {
        "manufacturer": manufacturer,
        "system": system,
        "diameter_mm": f"{diameter:g}" if diameter else None,
        "length_mm": f"{length:g}" if length else None,
        "connection": connection,
    }
    with progress_bar(progress) as bar:
        report = core.render_catalogue(
            models,
            out_dir,
            settings,
            flags={k: v for k, v in flags.items() if v},
            jobs=jobs,
            progress=(lambda done, total: bar("render", done, total)) if bar else None,
            force=force,
        )
    _print_report(report, json_out)
    if report.refused:
        raise typer.Exit(UnusableModel.exit_code)


def _print_report(report: Any, json_out: bool) -> None:
    for outcome in report.refused:
        err.print(f"refused: {outcome.message}", style="red", markup=False, highlight=False)
    for outcome in report.outcomes:
        if outcome.status == "rendered" and outcome.message:
            err.print(f"warning: {outcome.model.name}: {outcome.message}", style="yellow")
    if json_out:
        print_json(
            {
                "out": str(report.out),
                "images": report.images,
                "elapsed_s": round(report.elapsed_s, 3),
                "models": [
                    {
                        "model": str(o.model),
                        "implant": o.folder,
                        "status": o.status,
                        "views": o.views,
                        "faces": o.faces,
                        "message": o.message,
                    }
                    for o in report.outcomes
                ],
            }
        )
        return
    table = Table("model", "implant folder", "status", "views")
    for o in report.outcomes:
        table.add_row(o.model.name, o.folder or "", o.status, str(o.views))
    out.print(table)
    out.print(
        f"{report.images} images in {report.out} ({report.elapsed_s:.1f} s); "
        f"next: raiox ingest {report.out}",
        highlight=False,
    )
