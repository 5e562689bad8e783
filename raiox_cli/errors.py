"""Errors a user can fix, and the one table of exit codes the CLI turns them into.

`EXIT_CODES` is the single source: `raiox --help` is generated from it
(`help_text()`), and so is the README's list (`exit_code_rows()`). Each error
class carries the code of its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    DATABASE = 3
    MODEL_UNAVAILABLE = 4
    MODEL_MISMATCH = 5
    EMPTY_CATALOGUE = 6
    UNREADABLE_QUERY = 7
    UNUSABLE_MODEL = 8
    BUSY = 75  # EX_TEMPFAIL: try again later
    SIGHUP = 129  # 128 + the signal's number, as a shell reports it
    SIGINT = 130
    SIGTERM = 143


@dataclass(frozen=True)
class ExitCodeRow:
    code: ExitCode
    meaning: str


EXIT_CODES: tuple[ExitCodeRow, ...] = (
    ExitCodeRow(ExitCode.OK, "ok"),
    ExitCodeRow(ExitCode.FAILED, "some inputs failed"),
    ExitCodeRow(ExitCode.USAGE, "usage error"),
    ExitCodeRow(ExitCode.DATABASE, "database problem"),
    ExitCodeRow(ExitCode.MODEL_UNAVAILABLE, "model weights unavailable"),
    ExitCodeRow(ExitCode.MODEL_MISMATCH, "catalogue built with another model"),
    ExitCodeRow(ExitCode.EMPTY_CATALOGUE, "empty catalogue"),
    ExitCodeRow(ExitCode.UNREADABLE_QUERY, "the query image cannot be read"),
    ExitCodeRow(
        ExitCode.UNUSABLE_MODEL, "an implant model cannot be rendered (format, units, holes)"
    ),
    ExitCodeRow(
        ExitCode.BUSY,
        "another ingest/reindex holds the lock (or db stop found raiox processes using the "
        "embedded database)",
    ),
    ExitCodeRow(ExitCode.SIGHUP, "stopped by SIGHUP"),
    ExitCodeRow(ExitCode.SIGINT, "stopped by SIGINT"),
    ExitCodeRow(ExitCode.SIGTERM, "stopped by SIGTERM"),
)


def exit_code_rows() -> list[tuple[int, str]]:
    """(code, meaning) for every exit code, in order: what the README lists."""
    return [(int(row.code), row.meaning) for row in EXIT_CODES]


def help_text() -> str:
    """The exit codes as one paragraph of `raiox --help`; the signals share one entry."""
    signals = [row for row in EXIT_CODES if row.meaning.startswith("stopped by ")]
    others = [row for row in EXIT_CODES if row not in signals]
    codes = ", ".join(f"{int(row.code)} {row.meaning}" for row in others)
    names = "/".join(row.meaning.removeprefix("stopped by ") for row in signals)
    numbers = "/".join(str(int(row.code)) for row in signals)
    return f"Exit codes: {codes}; {numbers} stopped by {names}."


class RaioxError(Exception):
    """Base class: a one-line message that says what happened and what to do."""

    exit_code: int = ExitCode.FAILED


class UsageError(RaioxError):
    exit_code = ExitCode.USAGE


class DatabaseUnavailable(RaioxError):
    exit_code = ExitCode.DATABASE


class SchemaError(RaioxError):
    """Schema missing, too new, or pgvector not installed."""

    exit_code = ExitCode.DATABASE


class ModelUnavailable(RaioxError):
    exit_code = ExitCode.MODEL_UNAVAILABLE


class BackendUnavailable(ModelUnavailable):
    """RAIOX_BACKEND names an inference runtime that is not installed."""


class ModelMismatch(RaioxError):
    exit_code = ExitCode.MODEL_MISMATCH


class EmptyCatalogue(RaioxError):
    exit_code = ExitCode.EMPTY_CATALOGUE


class UnreadableQuery(RaioxError):
    """The one image a search was asked about cannot be decoded."""

    exit_code = ExitCode.UNREADABLE_QUERY


class UnusableModel(RaioxError):
    """An implant model file `raiox render` cannot use as it is: format, units, holes."""

    exit_code = ExitCode.UNUSABLE_MODEL


class Busy(RaioxError):
    """Another ingest/reindex holds the writer lock (EX_TEMPFAIL)."""

    exit_code = ExitCode.BUSY
