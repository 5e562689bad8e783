"""raiox confirm, export-labels: the dentists' answers, and the labelled set they make."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import ClientFilter, JsonOut, Since, settings
from raiox_cli.cli.render import print_failures, print_json, say
from raiox_cli.errors import RaioxError

app = group()


@command(app, "confirm")
@settings("database_url")
def confirm(
    analysis_id: Annotated[
        str,
        typer.Argument(
            help="the analysis: its id in the API (a UUID) or the number raiox search --save "
            "printed"
        ),
    ],
    implant_key: Annotated[
        str | None,
        typer.Argument(
            help="the implant it really is: its key manufacturer/system/name (or "
            "manufacturer/name), any implant of the catalogue",
            show_default=False,
        ),
    ] = None,
    not_in_catalogue: Annotated[
        bool,
        typer.Option("--not-in-catalogue", help="the implant is not in the catalogue at all"),
    ] = False,
    note: Annotated[
        str | None, typer.Option(help="a free-text note (at most 2000 characters)")
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(help="who confirms (stored with the confirmation)")
    ] = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Record which implant an analysis really shows (the dentist's answer).

    Confirming again keeps the history; the latest answer counts (eval --confirmed,
    export-labels). Exit 1 when the analysis or the implant does not exist or the
    analysis has no result yet; 2 on contradicting or oversized arguments.

    Examples:
      raiox confirm 42 "straumann/bone level/blx 4.0"
      raiox confirm 42 "Straumann/BLX 4.5" --note "seen on the surgical report"
      raiox confirm 43 --not-in-catalogue --note "Neodent Helix GM, not catalogued"
      raiox confirm 5f0c6a2e-8d1b-4c7e-9a53-2b6f1d0e7c41 straumann/blx --json
    """
    # lazy: start-up time
    from raiox_cli.clinics import feedback

    try:
        done = feedback.confirm_analysis(
            settings,
            analysis_id,
            implant_key,
            not_in_catalogue=not_in_catalogue,
            note=note,
            client_id=client_id,
        )
    except feedback.UnknownImplant as exc:
        raise RaioxError(
            f"{exc} (keys: raiox implants --search TEXT; --not-in-catalogue when it is not there)"
        ) from None
    if json_out:
        print_json(done.to_dict())
        return
    if done.implant is None:
        said = "not in the catalogue"
    else:
        implant = done.implant
        rank = f"raiox ranked it #{done.raiox_rank}" if done.raiox_rank else "raiox did not list it"
        said = f"{implant['key']} ({implant['name']}, {implant['manufacturer']}); {rank}"
    say(f"analysis {analysis_id} confirmed: {said}")
    if done.previous is not None:
        before = (done.previous["implant"] or {}).get("key") or "not in the catalogue"
        say(f"replaces the answer of {done.previous['confirmed_at'][:19]}: {before}")


@command(app, "export-labels")
@settings("database_url")
def export_labels(
    out_dir: Annotated[Path, typer.Argument(help="a new (or empty) folder to write into")],
    since: Since = None,
    client: ClientFilter = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Write the confirmed X-rays from the image store as labelled queries.

    Layout: OUT/<Manufacturer>/<Implant name>/<analysis id>.<ext> (what raiox eval
    reads) and OUT/labels.csv (path,expected_key,analysis_id,image_sha256,
    confirmed_at; analysis_id is the public id the API uses). X-rays confirmed "not
    in the catalogue" go to OUT/not-in-catalogue/ with OUT/not-in-catalogue.csv
    (their notes), where eval does not look. Only the latest confirmation of an
    analysis counts; unconfirmed analyses are never written. Exit 1 when some
    stored X-rays could not be read (listed on stderr).

    Example: raiox export-labels ./confirmed --since 2026-01-01 && raiox eval ./confirmed
    """
    # lazy: start-up time
    from raiox_cli.clinics import feedback

    report = feedback.export_labels_to(settings, out_dir, since=since, client=client)
    print_failures(report.failed)
    if json_out:
        print_json(report.to_dict())
    else:
        say(
            f"exported {report.exported} confirmed X-rays of {report.implants} implants to "
            f"{report.out}; {report.not_in_catalogue} not in the catalogue "
            f"({feedback.NOT_IN_CATALOGUE_DIR}/); {report.without_image} confirmed without a "
            "stored X-ray"
        )
    if not report.ok:
        raise typer.Exit(1)
