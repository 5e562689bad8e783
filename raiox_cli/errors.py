"""Errors a user can fix. Each carries the exit code the CLI turns it into.

Exit codes (documented in `raiox --help` and the README):
  0 ok, 1 some inputs failed / other error, 2 usage error,
  3 database problem, 4 model weights unavailable, 5 catalogue built with
  another model, 6 empty catalogue, 7 the query image cannot be read,
  8 an implant model cannot be rendered (format, units, holes),
  75 another writer holds the lock.
"""


class RaioxError(Exception):
    """Base class: a one-line message that says what happened and what to do."""

    exit_code = 1


class UsageError(RaioxError):
    exit_code = 2


class DatabaseUnavailable(RaioxError):
    exit_code = 3


class SchemaError(RaioxError):
    """Schema missing, too new, or pgvector not installed."""

    exit_code = 3


class ModelUnavailable(RaioxError):
    exit_code = 4


class BackendUnavailable(ModelUnavailable):
    """RAIOX_BACKEND names an inference runtime that is not installed."""


class ModelMismatch(RaioxError):
    exit_code = 5


class EmptyCatalogue(RaioxError):
    exit_code = 6


class UnreadableQuery(RaioxError):
    """The one image a search was asked about cannot be decoded."""

    exit_code = 7


class UnusableModel(RaioxError):
    """An implant model file `raiox render` cannot use as it is: format, units, holes."""

    exit_code = 8


class Busy(RaioxError):
    """Another ingest/reindex holds the writer lock (EX_TEMPFAIL)."""

    exit_code = 75
