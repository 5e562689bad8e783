"""Engines schedule the pipeline's stages (pipeline.py); they never implement one.

- `local` (pipeline.LocalEngine): decode threads in this process, the model in the
  caller's thread, a writer thread.
- `ray` (engines/ray.py): read + decode as Ray Data tasks, the model in a pool of Ray
  actors (one per GPU or per CPU slot), results back here in input order for the
  same writer. Needs the optional extra: pip install 'raiox[ray]'.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from raiox_cli.catalogue.engines.base import Engine
from raiox_cli.catalogue.engines.ray import RayEngine, require_ray
from raiox_cli.catalogue.engines.ray import session as ray_session
from raiox_cli.catalogue.pipeline import LocalEngine, worker_count

if TYPE_CHECKING:
    from raiox_cli.config import Settings
    from raiox_cli.embedding import ModelSpec


def check(settings: Settings) -> None:
    """Fail now, before any work, when the engine asked for cannot run here (Ray not
    installed: the message says how to install it)."""
    if settings.engine == "ray":
        require_ray()


@contextmanager
def open_engine(
    settings: Settings, spec: ModelSpec, *, batch_size: int | None = None
) -> Iterator[Engine]:
    """The engine settings.engine names, ready to map; a local Ray it started is
    stopped on exit. `batch_size`: items per model batch (default the setting's)."""
    batch_size = batch_size or settings.batch_size
    if settings.engine == "ray":
        with ray_session(settings):
            yield RayEngine(settings, spec, batch_size=batch_size)
        return
    yield LocalEngine(workers=worker_count(settings), batch_size=batch_size)
