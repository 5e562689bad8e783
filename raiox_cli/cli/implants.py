"""raiox implants [--manufacturer M] [--search TEXT], raiox implants show KEY: the
catalogue, as GET /implants and GET /implants/{id} answer it."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from raiox_cli import config
from raiox_cli.cli.clinics import database
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, settings
from raiox_cli.cli.render import fitted, out, print_json, say, size_mm

app = group(
    "implants",
    help="The catalogue's implants: list, filter, and show one.\n\n"
    'Example: raiox implants --search "helix 4.3"',
    no_args_is_help=False,
)


@command(app, None)
@settings("database_url")
def implants(
    ctx: typer.Context,
    manufacturer: Annotated[
        str | None, typer.Option(help="only this manufacturer's implants (any case)")
    ] = None,
    search: Annotated[
        str | None,
        typer.Option(help="only implants whose key or name holds every word of TEXT"),
    ] = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """List the catalogue's implants with their keys (what raiox confirm takes).

    Examples:
      raiox implants --manufacturer straumann
      raiox implants --search "blx 4.5" --json
      raiox implants show "straumann/bone level/blx 4.5x10"
    """
    if ctx.invoked_subcommand is not None:
        return
    # lazy: start-up time
    from raiox_cli.catalogue import implants as core

    with database(settings) as conn:
        listing = core.list_implants(conn, manufacturer=manufacturer, search=search)
    if json_out:
        print_json(listing.to_dict())
        return
    rows = listing.implants
    out.print(fitted(_wide(rows), lambda: _stacked(rows)))
    if not rows:
        filtered = manufacturer or search
        say("no implant matches" if filtered else "the catalogue is empty: raiox ingest FOLDER")
    elif listing.total > len(rows):
        say(f"{len(rows)} of {listing.total} implants: narrow with --search or --manufacturer")


def _wide(rows: list[dict[str, Any]]) -> Table:
    table = Table()
    columns = ("key", "name", "manufacturer", "system", "size mm", "connection", "images")
    for column in columns:
        table.add_column(column, justify="right" if column == "images" else "left")
    for row in rows:
        size = size_mm(row["diameter_mm"], row["length_mm"])
        cells = (row["key"], row["name"], row["manufacturer"], row["system"] or "", size)
        table.add_row(*cells, row["connection"] or "", str(row["images"]))
    return table


def _stacked(rows: list[dict[str, Any]]) -> Table:
    """80 columns: the key whole, the rest under it."""
    table = Table(show_lines=True)
    table.add_column("key", ratio=1)
    table.add_column("images", justify="right")
    for row in rows:
        size = size_mm(row["diameter_mm"], row["length_mm"])
        details = (row["name"], row["manufacturer"], row["system"], size and f"{size} mm")
        cell = Text(row["key"])
        cell.append("\n" + ", ".join(d for d in (*details, row["connection"]) if d), style="dim")
        table.add_row(cell, str(row["images"]))
    return table


@command(app, "show")
@settings("database_url")
def show(
    key: Annotated[
        str,
        typer.Argument(help="the implant's key manufacturer/system/name (or manufacturer/name)"),
    ],
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """One implant: its fields and its reference images.

    Example: raiox implants show "straumann/bone level/blx 4.5x10"
    """
    # lazy: start-up time
    from raiox_cli.catalogue import implants as core

    with database(settings) as conn:
        implant = core.show(conn, key)
    if json_out:
        print_json(implant)
        return
    table = Table(show_header=False, title=implant["key"])
    fields = ("name", "manufacturer", "system", "connection", "notes", "id")
    for name in fields[:4]:
        table.add_row(name, str(implant[name] or ""))
    table.add_row("size mm", size_mm(implant["diameter_mm"], implant["length_mm"]))
    for name in fields[4:]:
        table.add_row(name, str(implant[name] or ""))
    for name, value in (implant["extra"] or {}).items():
        table.add_row(name, str(value))
    table.add_row("updated", f"{implant['updated_at']:%Y-%m-%d %H:%M}")
    pictures = [
        f"{i['sha256'][:12]} {i['format'] or ''} {i['width']}x{i['height']}"
        for i in implant["images"]
    ]
    table.add_row(f"images ({len(pictures)})", "\n".join(pictures))
    out.print(table)
