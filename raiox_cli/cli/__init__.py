"""The raiox command line. Thin: parse options, call one core function, render.

Layout:
- `command.py`: `group()` and `command()`, which every command module uses;
- `options.py`: the shared options, and `@settings(...)` that turns the settings
  options into one resolved `config.Settings`;
- `render.py`: stdout/stderr consoles, JSON, the tables several commands share;
- one module per command group, each with its own `app = group()`.

Adding a command group (for example `raiox calibrate`):
1. write `raiox_cli/cli/calibrate.py`:

       from raiox_cli.cli.command import command, group
       from raiox_cli.cli.options import MODEL, settings

       app = group()  # or group("calibrate", help=...) for `raiox calibrate SUBCOMMAND`

       @command(app, "calibrate")
       @settings(*MODEL)
       def calibrate(json_out: JsonOut = False, *, settings: config.Settings) -> None:
           '''Its --help, with an example.'''

2. add one line to `_COMMANDS` below (the order is the order of `raiox --help`).

A command parses, calls one core function and renders (~20 lines); errors the user
can fix are `RaioxError`s raised by the core, which `command()` turns into one line
and the exit code of the table in raiox_cli.errors. Core modules are imported inside
the commands: `raiox --help` and `raiox init-db` must not load torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from raiox_cli import __version__, errors
from raiox_cli.cli import (
    adapt,
    backup,
    cad,
    calibrate,
    catalogue,
    clinics,
    db,
    demo,
    evaluate,
    feedback,
    implants,
    purge,
    search,
    server,
)
from raiox_cli.cli.render import out
from raiox_cli.lifecycle import exit_on_termination

app = typer.Typer(
    name="raiox",
    help="Identify the dental implant system in a radiograph.\n\n" + errors.help_text(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal [env ...] brackets
)

_COMMANDS = (
    catalogue,  # init-db, ingest, reindex, embed
    cad,  # render: implant models -> catalogue views
    search,
    implants,  # raiox implants [show]
    server,  # serve-webhook-minimal
    evaluate,
    calibrate,
    feedback,  # confirm, export-labels
    demo,
    adapt,
    purge,
    backup,  # backup, restore
    clinics,  # raiox clinics ...
    db,  # raiox db ...
)
for _module in _COMMANDS:
    app.add_typer(_module.app)
app.add_typer(clinics.app, name="clients", hidden=True)  # the old name, for existing scripts


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        out.print(f"raiox {__version__}")
        raise typer.Exit()


def main() -> None:
    exit_on_termination()  # SIGTERM/SIGHUP run atexit hooks too (the embedded database)
    app()
