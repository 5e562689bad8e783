"""raiox backup, restore: the database and the image store, in one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, settings
from raiox_cli.cli.render import err, print_json, say

app = group()


@command(app, "backup")
@settings("database_url")
def backup_(
    path: Annotated[
        Path, typer.Argument(help="a new folder to write (with --verify: the backup to check)")
    ],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="check PATH instead: restore it into a throwaway embedded server and "
            "compare every table's rows and every object's sha256 with its manifest",
        ),
    ] = False,
    objects_to: Annotated[
        str | None,
        typer.Option(
            "--objects-to",
            help="copy the image store's objects to this second location, a folder or "
            "s3://BUCKET, kept across backups: only objects not there yet are copied",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Back up the database and the image store into a new folder: pg_dump (custom
    format, one consistent snapshot while the server keeps working), the objects
    (into the folder; with --objects-to, incrementally into a second location; an
    S3 store without it: a list of keys with their sha256) and manifest.json
    (versions, row counts, checksums). Exit 1 when something does not match.

    Examples: raiox backup /var/backups/raiox/2026-11-27
              raiox backup /var/backups/raiox/2026-11-28 --objects-to s3://raiox-copies
              raiox backup --verify /var/backups/raiox/2026-11-27
    """
    # lazy: start-up time
    from raiox_cli.store import backup as core

    if verify:
        report = core.verify(path, settings)
    else:
        report = core.backup(settings, path, objects_to=objects_to)
    _print_backup("verified" if verify else "backed up into", report, json_out)


@command(app, "restore")
@settings("database_url")
def restore(
    path: Annotated[Path, typer.Argument(help="a folder written by raiox backup")],
    force: Annotated[
        bool, typer.Option("--force", help="replace a database or image store that holds data")
    ] = False,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Restore a backup into this RAIOX_HOME (or RAIOX_DATABASE_URL's database), which
    must be empty (a fresh init-db counts as empty) unless --force; then bring the
    schema up to date. Exit 1 when it holds data or something does not match.

    Example: RAIOX_HOME=/var/lib/raiox raiox restore /var/backups/raiox/2026-11-27
    """
    # lazy: start-up time
    from raiox_cli.store import backup as core

    _print_backup("restored", core.restore(settings, path, force=force), json_out)


def _print_backup(what: str, report: Any, json_out: bool) -> None:
    for problem in report.problems:
        err.print(problem, style="red", markup=False, highlight=False)
    if json_out:
        print_json(report.to_dict())
    else:
        say(
            f"{what} {report.path}: {len(report.tables)} tables, {report.rows} rows, "
            f"{report.objects} objects ({report.object_bytes:,} bytes) in "
            f"{report.elapsed_s:.1f} s"
        )
    if report.problems:
        raise typer.Exit(1)
