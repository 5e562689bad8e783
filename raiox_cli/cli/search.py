"""raiox search: one X-ray (a table, or --json), or many in batch (JSON lines)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, ShowProgress, settings
from raiox_cli.cli.render import (
    note,
    print_failures,
    print_json,
    print_matches,
    progress_bar,
    warn,
)
from raiox_cli.errors import UsageError

app = group()


@command(app, "search")
@settings(
    "workers", "batch_size", "engine", "ray_address",
    "database_url", "model", "pretrained", "weights", "device", "backend",
)  # fmt: skip
def search(
    images_: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="IMAGE...",
            help="the query radiograph; several files or folders (recursive) search in batch",
            show_default=False,
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="distinct implants to return")] = 3,
    crop: Annotated[
        str | None,
        typer.Option(help="search only this region: x,y,w,h in pixels or fractions (0.5,0,0.5,1)"),
    ] = None,
    manufacturer: Annotated[
        str | None, typer.Option(help="only implants of this manufacturer")
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="also search the image mirrored and upside down (upper jaw) "
            "[env RAIOX_TTA; default on]",
            show_default=False,
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            help="below this best score say 'no confident match' [env RAIOX_MIN_SCORE]",
            show_default=False,
        ),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option(
            min=1, max=1000, help="HNSW search breadth [env RAIOX_EF_SEARCH]", show_default=False
        ),
    ] = None,
    json_out: JsonOut = False,
    sheet: Annotated[
        Path | None, typer.Option(help="also write a contact sheet PNG here", show_default=False)
    ] = None,
    save: Annotated[bool, typer.Option("--save", help="record the analysis in the database")] = (
        False
    ),
    client_id: Annotated[
        str | None, typer.Option(help="client id stored with --save", show_default=False)
    ] = None,
    from_list: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="batch: also the X-rays listed in this CSV (column 'path', or the first "
            "column; relative to the CSV)",
            show_default=False,
        ),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="batch: append JSON lines here (resumable)", show_default=False),
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv", help="batch: append one CSV row per match here (resumable)", show_default=False
        ),
    ] = None,
    progress: ShowProgress = False,
    *,
    settings: config.Settings,
) -> None:
    """Print the top distinct implants for a radiograph, best first.

    Each match: implant, manufacturer, system, size, similarity score (cosine, 1 =
    identical) and margin to the next implant. Below --min-score the answer is "no
    confident match" (the matches are still listed). --json prints one object
    (schema in docs/guides/searching.md). Exit codes: 3 no database, 5 catalogue built with another
    model, 6 empty catalogue, 7 unreadable image.

    Several images, a folder or --from list.csv search in batch: one JSON line per
    X-ray on stdout (or --out FILE / --csv FILE), --save records analyses; a rerun
    with --out, --csv or --save skips what is answered; unreadable files are listed
    on stderr, exit 1. --engine ray runs the batch on Ray Data (docs/guides/backends.md).

    Example: raiox search pano.jpg --crop 820,400,300,420 -k 5 --sheet out.png
    Example: raiox search ./archive --from more.csv --out answers.jsonl
    """
    # lazy: start-up time
    from raiox_cli import analyses, images
    from raiox_cli.search import batch as batch_search
    from raiox_cli.search import query as core

    region = images.parse_crop(crop) if crop else None
    given = images_ or []
    batch = from_list or out_file or csv_file or len(given) != 1 or given[0].is_dir()
    if batch or settings.engine == "ray":  # the engines schedule batch searches
        options = batch_search.BatchOptions(
            k, region, manufacturer, save, client_id, out_file, csv_file
        )
        _search_batch(settings, given, from_list, options, sheet=sheet, progress=progress)
        return
    image = given[0]
    result = analyses.search_file(
        settings, image, k=k, crop=region, manufacturer=manufacturer,
        save=save, client_id=client_id, sheet_path=sheet,
    )  # fmt: skip
    warn(result.notes)
    if sheet is not None:
        note(f"contact sheet: {sheet}")
    if json_out:
        print_json(core.result_json(str(image), k, result))
    else:
        print_matches(f"{image} ({result.model_id})", result)


def _search_batch(
    settings: config.Settings,
    given: list[Path],
    from_list: Path | None,
    options: Any,
    *,
    sheet: Path | None,
    progress: bool,
) -> None:
    """`raiox search` over many X-rays: JSON lines out, failures and a summary on stderr."""
    # lazy: start-up time
    from raiox_cli.search import batch as batch_search

    if sheet is not None:
        raise UsageError("--sheet draws one X-ray: search a single image with it")
    paths = batch_search.collect(given, from_list)
    if not paths:
        raise UsageError("no X-rays to search: give image files, folders or --from list.csv")
    with progress_bar(progress) as bar:
        report = batch_search.search_many(settings, paths, options, emit=print_json, progress=bar)
    print_failures(report.failed)
    warn(report.notes)
    note(
        f"searched {report.inputs} X-rays in {report.elapsed_s:.1f} s: {report.answered} "
        f"answered ({report.per_s:.1f}/s), {report.skipped} already answered, "
        f"{len(report.failed)} failed"
    )
    if not report.ok:
        raise typer.Exit(1)
