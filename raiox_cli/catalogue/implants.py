"""The catalogue's implants as a person looks them up: a filtered listing, one
implant by its key, and suggestions when a key names none (`raiox implants`,
`raiox confirm`, the API's confirmations)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from raiox_cli.db import queries
from raiox_cli.errors import RaioxError
from raiox_cli.search import evaluate

MAX_LISTED = 10_000  # a catalogue listing is for people: past this, --search narrows it
SUGGESTIONS = 3


class UnknownImplant(RaioxError):
    """A key names no implant of the catalogue; `suggestions` are the closest keys."""

    def __init__(self, text: str, suggestions: Sequence[str]) -> None:
        self.text = text
        self.suggestions = list(suggestions)
        hint = f"; did you mean {' or '.join(map(repr, suggestions))}?" if suggestions else ""
        super().__init__(f"no implant {text!r} in the catalogue{hint}")


@dataclass
class Listing:
    implants: list[dict[str, Any]]
    total: int  # matching implants, when more than listed
    manufacturer: str | None = None
    words: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "items": self.implants}


def words_of(text: str | None) -> list[str]:
    return [w for w in re.split(r"[\s/,]+", (text or "").strip()) if w]


def list_implants(
    conn: psycopg.Connection,
    *,
    manufacturer: str | None = None,
    search: str | None = None,
    limit: int = MAX_LISTED,
) -> Listing:
    """Implants of one manufacturer and/or holding every word of `search` in their
    key or name; the query GET /implants pages through."""
    words = words_of(search)
    rows = queries.list_implants(conn, skip=0, limit=limit, manufacturer=manufacturer, words=words)
    total = len(rows)
    if total == limit:
        total = queries.count_implants_matching(conn, manufacturer=manufacturer, words=words)
    return Listing(rows, total, manufacturer, words)


def find(conn: psycopg.Connection, text: str) -> dict[str, Any]:
    """The implant a key names: exact, or as `raiox eval` labels match (any case and
    spacing, manufacturer/system/name or manufacturer/name). UnknownImplant, with the
    closest keys, when none."""
    found = queries.implant_by_key(conn, text)
    if found is None:
        key = evaluate.resolve_label(conn, text)
        found = queries.implant_by_key(conn, key) if key else None
    if found is None:
        raise UnknownImplant(text, suggest_keys(text, queries.implant_keys(conn)))
    return found


def show(conn: psycopg.Connection, text: str) -> dict[str, Any]:
    """One implant with its reference images (what GET /implants/{id} answers, less
    the image links)."""
    implant = queries.get_implant(conn, find(conn, text)["id"])
    assert implant is not None  # found a moment ago, in the same transaction
    images = queries.implant_images_of(conn, implant["id"])
    return {
        **implant,
        "images": [{k: v for k, v in i.items() if k != "storage_key"} for i in images],
    }


def suggest_keys(text: str, keys: Sequence[str], n: int = SUGGESTIONS) -> list[str]:
    """The keys closest to `text`: by spelling when one is close; otherwise the keys
    that share the most of its words (a far-off key often still names the maker
    or the size), the closer spelling first among equals."""
    wanted = text.casefold().strip()
    close = difflib.get_close_matches(wanted, keys, n=n)
    if close:
        return close
    words = set(words_of(wanted))

    def shared(key: str) -> int:
        return sum(1 for w in words if w in key.casefold())

    ranked = sorted(
        (k for k in keys if shared(k)),
        key=lambda k: (-shared(k), -difflib.SequenceMatcher(None, wanted, k.casefold()).ratio()),
    )
    return ranked[:n]
