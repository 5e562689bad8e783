"""Engines schedule the pipeline's stages (pipeline.py); they never implement one.

- `local` (pipeline.LocalEngine): decode threads in this process, the model in the
  caller's thread, a writer thread.
- `ray` (engines/ray.py): read + decode as Ray Data tasks, the model in a pool of Ray
  actors (one per GPU or per CPU slot), results back here in input order for the
  same writer. Needs the optional extra: pip install 'raiox[ray]'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from raiox_cli.config import Settings
    from raiox_cli.embedding import ModelSpec

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


def check(settings: Settings) -> None:
    """Fail now, before any work, when the engine asked for cannot run here (Ray not
    installed: the message says how to install it)."""
    if settings.engine == "ray":
        from raiox_cli.catalogue.engines.ray import require_ray

        require_ray()


@contextmanager
def open_engine(
    settings: Settings, spec: ModelSpec, *, batch_size: int | None = None
) -> Iterator[Engine]:
    """The engine settings.engine names, ready to map; a local Ray it started is
    stopped on exit. `batch_size`: items per model batch (default the setting's)."""
    batch_size = batch_size or settings.batch_size
    if settings.engine == "ray":
        from raiox_cli.catalogue.engines import ray

        with ray.session(settings):
            yield ray.RayEngine(settings, spec, batch_size=batch_size)
        return
    from raiox_cli.catalogue.pipeline import LocalEngine, worker_count

    yield LocalEngine(workers=worker_count(settings), batch_size=batch_size)
