"""One JSON object per line on stderr: easy for journald, grep and log shippers."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("raiox.server")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup(debug: bool = False) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    log.log(level, name, exc_info=exc_info, extra={"fields": fields})
