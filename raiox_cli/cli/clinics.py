"""raiox clinics add, list, rotate, revoke: who may use the server, with which key.

`raiox clients ...` is the same group under its old name (hidden), for existing scripts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.table import Table

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, settings
from raiox_cli.cli.render import err, out, print_json, say

app = group(
    "clinics",
    help="Clinics that use the server with their own API key (docs/guides/clinics.md).\n\n"
    "Example: raiox clinics add sorriso-sp --email dr@sorriso.example",
)


@contextlib.contextmanager
def database(settings: config.Settings) -> Iterator[Any]:
    """A connection to a database whose schema is up to date."""
    # lazy: start-up time
    from raiox_cli import db

    with db.connect(settings) as conn:
        db.check_schema(conn)
        yield conn


Timezone = Annotated[
    str | None,
    typer.Option(
        help="IANA time zone of its pages and e-mails, e.g. America/Sao_Paulo "
        "[default: RAIOX_TIMEZONE]",
        show_default=False,
    ),
]


def _clinic_json(row: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    data = {k: v for k, v in row.items() if k != "id"}
    return {**data, "key": key} if key else data


def _print_new_key(row: dict[str, Any], key: str, json_out: bool, what: str) -> None:
    if json_out:
        print_json(_clinic_json(row, key))
        return
    say(key)  # alone on stdout: KEY=$(raiox clinics add ...)
    err.print(
        f"{what} for {row['name']}; it is shown only now: store it in a password manager. "
        f"Use it as 'Authorization: Bearer KEY', 'X-Raiox-Key: KEY' or ?key=KEY (Jotform).",
        markup=False,
        highlight=False,
    )


@command(app, "add")
@settings("database_url")
def add(
    name: Annotated[str, typer.Argument(help="the clinic's name, unique (e.g. sorriso-sp)")],
    notify_url: Annotated[
        str | None, typer.Option(help="POST finished analyses of this clinic here")
    ] = None,
    email: Annotated[str | None, typer.Option(help="the clinic's contact for results")] = None,
    timezone: Timezone = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Create a clinic and print its API key (once: only a hash is stored).

    Example: KEY=$(raiox clinics add sorriso-sp --email dr@sorriso.example)
    """
    # lazy: start-up time
    from raiox_cli.clinics import keys

    with database(settings) as conn:
        row, key = keys.add(conn, name, notify_url=notify_url, email=email, timezone=timezone)
    _print_new_key(row, key, json_out, "new API key")


@command(app, "update")
@settings("database_url")
def update(
    name: Annotated[str, typer.Argument(help="the clinic")],
    timezone: Timezone = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Change a clinic's settings: its time zone (pages and e-mails; the API stays UTC).

    Example: raiox clinics update sorriso-sp --timezone America/Sao_Paulo
    """
    # lazy: start-up time
    from raiox_cli.clinics import keys

    with database(settings) as conn:
        row = keys.set_timezone(conn, name, timezone)
    if json_out:
        print_json(_clinic_json(row))
    else:
        out.print(f"{row['name']}: time zone {row['timezone'] or 'of the server (RAIOX_TIMEZONE)'}")


@command(app, "list")
@settings("database_url")
def list_(json_out: JsonOut = False, *, settings: config.Settings) -> None:
    """Every clinic: created, last used, analyses kept (and purged), state. Never keys.

    Example: raiox clinics list --json
    """
    # lazy: start-up time
    from raiox_cli.clinics import keys

    with database(settings) as conn:
        rows = keys.list_rows(conn)
    if json_out:
        print_json([{**_clinic_json(row), "state": keys.state(row)} for row in rows])
        return
    table = Table(title="clinics")
    for column in ("name", "created", "last used", "analyses", "purged", "state", "contact"):
        table.add_column(column, justify="right" if column in {"analyses", "purged"} else "left")
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['created_at']:%Y-%m-%d %H:%M}",
            f"{row['last_used_at']:%Y-%m-%d %H:%M}" if row["last_used_at"] else "never",
            str(row["analyses"]),
            str(row["purged"]),
            keys.state(row),
            ", ".join(x for x in (row["email"], row["notify_url"]) if x),
        )
    out.print(table)
    if not rows:
        out.print('no clinics yet; add one with "raiox clinics add NAME"')


@command(app, "rotate")
@settings("database_url")
def rotate(
    name: Annotated[str, typer.Argument(help="the clinic")],
    grace: Annotated[
        str, typer.Option(help="how long the old key keeps working: 24h, 7d, 0s (none)")
    ] = "24h",
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Give a clinic a new API key; the old one keeps working for --grace.

    Example: raiox clinics rotate sorriso-sp --grace 2h
    """
    # lazy: start-up time
    from raiox_cli.clinics import keys

    grace_s = config.parse_duration(grace, what="--grace")
    with database(settings) as conn:
        row, key = keys.rotate(conn, name, grace_s=grace_s)
    _print_new_key(row, key, json_out, f"new API key (the old one works for {grace} more)")


@command(app, "revoke")
@settings("database_url")
def revoke(
    name: Annotated[str, typer.Argument(help="the clinic")],
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Stop every key of a clinic now (401 from the next request). Its analyses stay
    until purged.

    Example: raiox clinics revoke sorriso-sp
    """
    # lazy: start-up time
    from raiox_cli.clinics import keys

    with database(settings) as conn:
        row = keys.revoke(conn, name)
    if json_out:
        print_json(_clinic_json(row))
    else:
        out.print(f"revoked {row['name']} at {row['revoked_at']:%Y-%m-%d %H:%M:%S %Z}")
