"""Bounds on everything a client sends, checked before any of it reaches SQL or a log.

PostgreSQL refuses NUL characters in text and Python cannot encode a lone UTF-16
surrogate as UTF-8, so either one in a field used to become a 500 deep in the
data layer. Parsers recurse: JSON nested thousands of levels deep exhausts
Python's stack. Here every string is length-bounded and checked for both, every
JSON document is parsed under a depth bound, and each failure is one short
reason that the server answers with 400.
"""

from __future__ import annotations

import json
import math
from typing import Any

from raiox_cli.errors import RaioxError

MAX_URL = 2048  # what browsers and most servers accept
MAX_ID = 200  # client ids, delivery ids, Jotform form/submission ids
MAX_TEXT = 2000  # a free-text answer or note
MAX_DEPTH = 32  # JSON nesting; real deliveries use 3 or 4 levels
MAX_ITEMS = 1000  # keys + list items in one JSON document
MAX_METADATA_BYTES = 64 * 1024  # metadata kept with an analysis, as JSON
# What the schema says of every client string `text` checks: no NUL anywhere. (The
# lone surrogates `text` also refuses cannot be in a JSON Schema string at all.)
NO_NUL = "^[^\\u0000]*$"


class BadInput(RaioxError):
    """A request field is malformed or out of bounds: answered with 400."""


def _show(field: str) -> str:
    return field if len(field) <= 60 else field[:57] + "..."


def text(value: Any, field: str, *, max_len: int) -> str:
    """A string PostgreSQL will store: no NUL, valid UTF-8, at most max_len characters."""
    if not isinstance(value, str):
        raise BadInput(f'"{_show(field)}" must be a string')
    if len(value) > max_len:
        raise BadInput(f'"{_show(field)}" is longer than {max_len} characters')
    if "\x00" in value:
        raise BadInput(f'"{_show(field)}" contains a NUL character')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f'"{_show(field)}" is not valid Unicode (lone surrogate)') from None
    return value


def optional_text(value: Any, field: str, *, max_len: int) -> str | None:
    return None if value is None else text(value, field, max_len=max_len)


def loads(data: str | bytes, what: str) -> Any:
    """json.loads that answers BadInput for anything a client can send.

    Too deep a document stops CPython's parser with RecursionError (it guards its
    own recursion), which becomes a 400 here; json_value bounds what is kept.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{what} is not UTF-8") from None
    try:
        return json.loads(data)
    except RecursionError:
        raise BadInput(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise BadInput(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def json_value(value: Any, field: str) -> Any:
    """Check every key and string of a parsed JSON value; returns it unchanged."""
    count = 0

    def walk(node: Any, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_ITEMS:
            raise BadInput(f'"{_show(field)}" has more than {MAX_ITEMS} items')
        if depth > MAX_DEPTH:
            raise BadInput(f'"{_show(field)}" is nested deeper than {MAX_DEPTH} levels')
        if isinstance(node, str):
            text(node, path, max_len=MAX_METADATA_BYTES)
        elif isinstance(node, dict):
            for key, item in node.items():
                text(key, f"{path} key", max_len=MAX_ID)
                walk(item, f"{path}.{key}", depth + 1)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]", depth + 1)
        elif isinstance(node, float) and not math.isfinite(node):  # json.loads takes NaN
            raise BadInput(f'"{_show(path)}" is not a finite number')

    walk(value, field, 0)
    size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise BadInput(f'"{_show(field)}" is larger than {MAX_METADATA_BYTES} bytes')
    return value


def header(value: str | None, name: str, *, max_len: int = MAX_ID) -> str | None:
    """An identifier taken from a header (webhook-id, Idempotency-Key)."""
    if value is None or value == "":
        return None
    return text(value, name, max_len=max_len)


def for_log(value: Any, limit: int = 200) -> Any:
    """What a log line may carry of a client's value: bounded, never a megabyte."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"...(+{len(value) - limit} chars)"
    return value
