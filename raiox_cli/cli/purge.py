"""raiox purge: delete old analyses with their stored X-rays."""

from __future__ import annotations

from typing import Annotated

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, settings
from raiox_cli.cli.render import print_json, say

app = group()


@command(app, "purge")
@settings("database_url")
def purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="age of the analyses to delete: 90d, 12w, 48h")
    ],
    client: Annotated[
        str | None, typer.Option("--client", help="only this clinic's analyses")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="count what would be deleted; delete nothing")
    ] = False,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Delete analyses older than --older-than with their stored X-rays (only anonymous
    daily counts stay). RAIOX_RETENTION_DAYS makes the nightly reindex do the same.

    Example: raiox purge --older-than 90d --client sorriso-sp --dry-run
    """
    # lazy: start-up time
    from raiox_cli.clinics import retention

    seconds = config.parse_duration(older_than, what="--older-than")
    report = retention.purge_older_than(
        settings, older_than_s=seconds, clinic=client, dry_run=dry_run
    )
    if json_out:
        print_json(report.to_dict())
    else:
        verb = "would delete" if dry_run else "deleted"
        say(
            f"{verb} {report.analyses} analyses older than {older_than}"
            f"{f' of {client}' if client else ''} and {report.objects} stored images"
        )
