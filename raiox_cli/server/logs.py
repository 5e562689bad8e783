"""One JSON object per line on stderr: easy for journald, grep and log shippers."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from raiox_cli.server.inputs import for_log
from raiox_cli.stderr import StderrHandler

log = logging.getLogger("raiox.server")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        # Bounded: a field may come from a client (a 1 MB client_id must not be logged whole).
        entry.update({k: for_log(v, 300) for k, v in getattr(record, "fields", {}).items()})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def setup(debug: bool = False) -> None:
    handler = StderrHandler()
    handler.setFormatter(_JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    log.log(level, name, exc_info=exc_info, extra={"fields": fields})


def audit(action: str, *, client: str, analysis: object | None, **fields: Any) -> None:
    """One line per access to patient data: who (a clinic's name, or "operator"),
    which analysis (its public id), what (read, list, create, delete, feedback,
    page). Never image bytes, never keys."""
    event("audit", action=action, client=client, analysis=analysis, **fields)
