"""The Ray Data engine: the pipeline's stages on a Ray cluster, or a local Ray.

Operators, in order (docs/guides/backends.md, "A Ray cluster"):

1. read + decode: `map_batches` tasks (one CPU each) run the caller's per-item
   function, the same one the local engine runs in its decode threads
   (pipeline.read -> pipeline.decode, plus what the caller adds, such as ingest's
   "already known" check and the image store). Items are read where the task runs,
   so a catalogue must be readable by every worker: a shared folder or s3://.
2. embed: `map_batches` over a pool of actors that each hold the model
   (embedding.load_embedder), one per GPU (`ray_gpus_per_actor` 0.5 puts two on a
   GPU) or, without GPUs, one per two CPUs; each batch is one pipeline.embed call.
3. write: results come back to the driver in input order and go to the caller's
   writer (pipeline.Writer: one transaction per batch, the same idempotent upserts
   as the local engine), so a killed or restarted job converges to the same rows.

Ray is an optional extra; without it `--engine ray` says how to install it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from raiox_cli import embedding
from raiox_cli.catalogue import pipeline
from raiox_cli.catalogue.engines.base import row_of
from raiox_cli.config import Settings
from raiox_cli.errors import RaioxError, UsageError

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'raiox[ray]'"
DECODE_BATCH = 16  # files per read + decode task: enough to hide a task's overhead
# Per decode task. It also keeps Ray from fusing decode into the model actors (fused
# operators need equal resource arguments), which would decode one file at a time
# behind the model instead of in parallel.
DECODE_MEMORY = 1024 * 1024 * 1024


class EngineUnavailable(UsageError):
    """Ray is not installed, or the cluster cannot be joined."""


def require_ray() -> Any:
    """The ray module with Ray Data, or an error that says how to install them."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EngineUnavailable(
            f"--engine ray needs Ray Data, which is not installed ({exc.name or exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return ray


@contextmanager
def session(settings: Settings) -> Iterator[Any]:
    """Join the cluster at --ray-address / RAY_ADDRESS, else start a local Ray that
    this process stops again; a Ray already initialised here is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = logging.DEBUG if settings.debug else logging.WARNING
    if not settings.ray_address and os.environ.get("RAY_USAGE_STATS_ENABLED") == "0":
        _dashboard_without_cloud_probe(ray)
    try:
        ray.init(
            address=settings.ray_address or None,
            include_dashboard=False,
            logging_level=quiet,
            log_to_driver=settings.debug,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = settings.ray_address or "a local instance"
        raise EngineUnavailable(
            f"cannot start or join Ray ({where}): {exc}; check --ray-address / RAY_ADDRESS"
        ) from exc
    logging.getLogger("ray.data").setLevel(quiet)
    try:
        yield ray
    finally:
        ray.shutdown()
        while _SPARE_HOMES:
            shutil.rmtree(_SPARE_HOMES.pop(), ignore_errors=True)


_SPARE_HOMES: list[Path] = []


def _dashboard_without_cloud_probe(ray: Any) -> None:
    """Start a local Ray's dashboard process with a HOME of its own that holds an
    empty `ray_bootstrap_config.yaml`, so that it asks no cloud metadata server.

    Why: ray.init always starts the dashboard process (include_dashboard=False still
    loads its UsageStatsHead module), and that module reads
    ~/ray_bootstrap_config.yaml *before* it checks whether usage statistics are on;
    when the file is missing it asks 169.254.169.254 and metadata.google.internal
    which cloud it runs on (Ray 2.x usage_lib.get_cluster_config_to_report). No
    setting skips it. Only the dashboard's start is wrapped: the raylet and the
    workers running raiox's code keep the real HOME. Applied once per process, only
    while usage statistics are off (lifecycle.keep_telemetry_off, unless the
    operator opted in) and the Ray is local; if Ray's internals moved, nothing is
    wrapped and tests/test_egress.py says so."""
    services = getattr(getattr(ray, "_private", None), "services", None)
    start = getattr(services, "start_api_server", None)
    if start is None or getattr(start, "_raiox_home", False):
        return

    @functools.wraps(start)
    def start_api_server(*args: Any, **kwargs: Any) -> Any:
        home = Path(tempfile.mkdtemp(prefix="raiox-ray-dashboard-"))
        (home / "ray_bootstrap_config.yaml").write_text(
            "# raiox: keeps a local Ray's dashboard from asking cloud metadata servers\n{}\n"
        )
        real = os.environ.get("HOME")
        os.environ["HOME"] = str(home)
        try:
            return start(*args, **kwargs)
        finally:
            if real is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = real
            _SPARE_HOMES.append(home)  # read by the dashboard later: removed at shutdown

    start_api_server._raiox_home = True  # type: ignore[attr-defined]
    services.start_api_server = start_api_server


class RayEngine:
    """Maps a per-item stage function over items as Ray Data tasks and embeds the
    rows it returns in the model actors; yields the results in input order."""

    def __init__(self, settings: Settings, spec: embedding.ModelSpec, *, batch_size: int):
        self.ray = require_ray()
        self.settings = settings
        self.spec = spec
        self.batch_size = max(1, batch_size)

    def actors(self) -> tuple[int, dict[str, float]]:
        """How many model actors, and each one's resources."""
        resources = self.ray.cluster_resources()
        gpus = float(resources.get("GPU", 0)) if self.spec.device != "cpu" else 0.0
        if gpus > 0:
            per_actor = self.settings.ray_gpus_per_actor
            count = self.settings.ray_actors or max(1, int(gpus / per_actor))
            return count, {"num_gpus": per_actor, "num_cpus": 1}
        cpus = int(resources.get("CPU", 1))
        # Half the CPU slots hold the model, the rest decode (an actor pool that took
        # every slot would leave none for the decode tasks feeding it).
        return self.settings.ray_actors or max(1, cpus // 2), {"num_cpus": 1}

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        from ray.data import ActorPoolStrategy, DataContext

        todo = list(items)
        if not todo:
            return
        count, resources = self.actors()
        spec = self.spec if resources.get("num_gpus") else _on_cpu(self.spec)
        context = DataContext.get_current()
        saved = (context.execution_options.preserve_order, context.enable_progress_bars)
        # Input order: the writer then sees items as the local engine does (the first
        # of two identical files is the one recorded, whichever engine runs).
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # the caller reports progress
        try:
            dataset = (
                self.ray.data.from_items([{"item": item} for item in todo])
                .map_batches(
                    _stage,
                    fn_args=(fn,),
                    batch_size=min(self.batch_size, DECODE_BATCH),
                    batch_format="numpy",
                    num_cpus=1,
                    memory=DECODE_MEMORY,
                )
                .map_batches(
                    _EmbedActor,
                    fn_constructor_args=(spec,),
                    compute=ActorPoolStrategy(size=count),
                    batch_size=self.batch_size,
                    batch_format="numpy",
                    **resources,
                )
            )
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                yield from batch["item"]
        except Exception as exc:
            # A raiox error inside a task or actor (weights missing on a worker, say)
            # reaches the user as its own one line, not as Ray's wrapped traceback.
            cause = _raiox_cause(exc)
            if cause is None or cause is exc:
                raise
            raise cause from exc
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved


def _raiox_cause(exc: BaseException) -> RaioxError | None:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, RaioxError):
            return cause
        seen.add(id(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


def _on_cpu(spec: embedding.ModelSpec) -> embedding.ModelSpec:
    from dataclasses import replace

    return replace(spec, device="cpu")


def _column(values: list[Any]) -> np.ndarray:
    """A 1-D object column (np.array would turn rows of sequences into a matrix)."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def _stage(batch: dict[str, np.ndarray], fn: Callable[[Any], Any]) -> dict[str, np.ndarray]:
    """A read + decode task: the caller's per-item function over a batch."""
    return {"item": _column([fn(item) for item in batch["item"]])}


class _EmbedActor:
    """A model actor: loads the model once, then embeds batch after batch."""

    def __init__(self, spec: embedding.ModelSpec):
        self.embedder = embedding.load_embedder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = list(batch["item"])
        rows = [row for row in map(row_of, results) if row is not None]
        pipeline.embed(rows, self.embedder)
        return {"item": _column(results)}
