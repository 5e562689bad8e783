"""raiox db status, stop: the database server (the embedded one by default)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, settings
from raiox_cli.cli.render import out, print_json
from raiox_cli.errors import ExitCode, UsageError

app = group("db", help="Inspect or stop the database server (the embedded one by default).")


@command(app, "status")
@settings("database_url")
def status(json_out: JsonOut = False, *, settings: config.Settings) -> None:
    """Is the database running, which versions, which schema, which raiox processes
    hold the embedded one. Never starts it. Exit 3 when an external server is unreachable.

    Example: raiox db status --json
    """
    # lazy: start-up time
    from raiox_cli import db

    report = db.status(settings)
    if json_out:
        print_json(report.to_dict())
    else:
        _print_db_status(report)
    if report.mode == "external" and not report.reachable:
        raise typer.Exit(ExitCode.DATABASE)


def _print_db_status(report: Any) -> None:
    rows: list[tuple[str, Any]] = [("database", f"{report.mode} {report.url or ''}".strip())]
    state = report.embedded
    if state is not None:
        running = f"yes, postmaster pid {state.postmaster_pid}" if state.running else "no"
        rows += [("running", running), ("data dir", f"{state.data_dir} ({state.size_bytes:,} B)")]
    else:
        rows.append(("reachable", "yes" if report.reachable else f"no: {report.error}"))
    rows += [
        ("PostgreSQL", report.postgresql_version),
        ("pgvector", report.pgvector_version),
        ("schema version", report.schema_version),
    ]
    if state is not None:
        holders = [f"pid {h.pid}: {h.command}" for h in state.holders]
        rows.append(("holders", "\n".join(holders) or "none"))
        if state.stale_handles:
            rows.append(("killed holders", ", ".join(map(str, state.stale_handles))))
    table = Table(show_header=False)
    for name, value in rows:
        table.add_row(name, "" if value is None else str(value))
    out.print(table)
    if state is not None and state.orphaned:
        out.print(
            "no raiox process holds it (its last holder was killed): the next raiox "
            'command adopts it and stops it when done, or run "raiox db stop"',
            highlight=False,
        )


@command(app, "stop")
def stop(
    force: Annotated[
        bool, typer.Option("--force", help="stop it even while raiox processes use it")
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Stop the embedded PostgreSQL of RAIOX_HOME. Refuses (exit 75), naming them,
    while raiox processes still use it, unless --force (their connections are cut).

    Example: raiox db stop
    """
    # lazy: start-up time
    from raiox_cli.db import embedded

    settings = config.resolve()
    if settings.database_url:
        raise UsageError("RAIOX_DATABASE_URL is set: raiox stops only its embedded server")
    report = embedded.stop(settings.pgdata_dir, force=force)
    if json_out:
        print_json(report.to_dict())
    elif report.was_running:
        cut = f"; cut off {len(report.forced_holders)} holder(s)" if report.forced_holders else ""
        out.print(f"stopped PostgreSQL pid {report.postmaster_pid}{cut}", highlight=False)
    else:
        out.print(f"no embedded PostgreSQL runs in {report.data_dir}", highlight=False)
