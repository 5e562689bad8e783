"""What every engine shares: the Engine protocol and where a stage's row is."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Engine(Protocol):
    """Maps a per-item stage function over items, results in input order. The Ray
    engine also embeds the rows the function returns (row["vectors"]); the local
    engine leaves that to the caller's thread (pipeline.embed skips embedded rows)."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]: ...


def row_of(result: Any) -> dict[str, Any] | None:
    """The pipeline row inside a stage function's result: the result itself when it
    is a row (dict), else its `row` attribute (ingest's Prepared), else None."""
    if isinstance(result, dict):
        return result
    row = getattr(result, "row", None)
    return row if isinstance(row, dict) else None
