"""raiox init-db, ingest, reindex, embed: build and keep the catalogue index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import (
    JsonOut,
    Model,
    NoStore,
    Precision,
    Pretrained,
    ShowProgress,
    Wait,
    Weights,
    settings,
)
from raiox_cli.cli.render import err, note, out, print_failures, print_json, progress_bar, say
from raiox_cli.errors import ModelUnavailable

app = group()


@command(app, "init-db")
@settings("database_url")
def init_db(*, settings: config.Settings) -> None:
    """Create or upgrade the database schema (safe to run again).

    Example: raiox init-db --database-url postgresql://raiox@db.example/raiox
    """
    # lazy: start-up time
    from raiox_cli import db, embedding

    report = db.migrate(settings)
    if report.applied:
        say(f"applied {', '.join(report.applied)} on {report.url}")
    else:
        say(f"schema already at version {report.version}; nothing to do")
    try:  # export the model for the ONNX backend now, when that backend runs it
        embedding.prepare_backend(embedding.ModelSpec.from_settings(settings))
    except ModelUnavailable as exc:  # not init-db's failure: the first search says why
        err.print(f"raiox init-db: the model is not exported yet: {exc}", highlight=False)


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


@command(app, "ingest")
@settings(
    "workers", "batch_size", "device", "backend", "engine", "ray_address",
    "database_url", "model", "pretrained", "weights",
)  # fmt: skip
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
    *,
    settings: config.Settings,
) -> None:
    """Embed a catalogue folder into the database; unchanged files are skipped.

    Safe to interrupt and run again. Exit 1 when some files failed (listed on
    stderr), 2 when PATH is not a catalogue folder, 75 when another ingest/reindex
    is running. Example: raiox ingest ./catalogue --prune --json
    """
    # lazy: start-up time
    from raiox_cli.catalogue import ingest as core

    options = core.IngestOptions(prune=prune, dry_run=dry_run, store=not no_store, wait=wait)
    with progress_bar(progress) as bar:
        report = core.ingest_catalogue(settings, path, options, progress=bar)
    print_failures(report.failed)
    if json_out:
        print_json(report.to_dict())
    else:
        table = Table(title=f"{'dry run: ' if dry_run else ''}{report.root} ({report.model_id})")
        table.add_column("images")
        table.add_column("count", justify="right")
        for name, value in _ingest_rows(report):
            table.add_row(name, value)
        out.print(table)
    if not report.ok:
        raise typer.Exit(1)


@command(app, "reindex")
@settings("workers", "batch_size", "device", "backend", "database_url")
def reindex(
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    precision: Precision = None,
    no_store: NoStore = False,
    wait: Wait = False,
    progress: ShowProgress = False,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Nightly upkeep: re-ingest every catalogue folder with --prune, embed images
    missing the active model's embedding, keep the index valid.

    --model/--pretrained/--weights/--precision switch the catalogue to that model: search keeps
    answering from the old one until every image has the new embedding, then the
    switch is one transaction. Silent on success when not on a terminal (cron);
    problems go to stderr with exit 1; 75 when another writer runs.
    Example (crontab): 17 3 * * * raiox reindex --json >> /var/log/raiox-reindex.log
    """
    # lazy: start-up time
    from raiox_cli.catalogue import reindex as core
    from raiox_cli.search import calibration_data

    switch = any(option is not None for option in (model, pretrained, weights, precision))
    with progress_bar(progress) as bar:
        report = core.reindex(settings, switch=switch, wait=wait, store=not no_store, progress=bar)
    refit = calibration_data.refit_stale(settings)  # after a model switch: trust again
    for root in report.roots:
        print_failures(root.failed)
    print_failures(report.failed)
    if refit is not None:
        note(_refit_line(refit))
    if json_out:
        print_json({**report.to_dict(), "calibration": refit})
    elif out.is_terminal:
        switched = f", switched from {report.previous_model_id}" if report.switched else ""
        say(
            f"reindexed {len(report.roots)} catalogue folder(s) with {report.model_id}"
            f"{switched}: {sum(r.embedded for r in report.roots) + report.reembedded} embedded, "
            f"{sum(r.removed for r in report.roots)} removed in {report.elapsed_s:.1f} s"
        )
    if not report.ok:
        raise typer.Exit(1)


def _refit_line(refit: dict[str, Any]) -> str:
    if not refit["refitted"]:
        return f"calibration {refit['reason']}, not refitted: {refit['error']}"
    coverage = refit["coverage"]
    measured = f", coverage {coverage:.1%} for {refit['target']:.0%}" if coverage else ""
    return (
        f"calibration {refit['reason']}: refitted from {refit['source']} ({refit['why']}){measured}"
    )


@command(app, "embed")
@settings("model", "pretrained", "weights", "device", "backend", "batch_size")
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
    *,
    settings: config.Settings,
) -> None:
    """Print one JSON line per image: path, model_id and its embedding.

    Bad files get one line each on stderr and exit code 1; the good ones are still
    output. Example: raiox embed xray1.jpg xray2.dcm --crop 0.5,0,0.5,1.0 --out vectors.npy
    """
    # lazy: start-up time
    from raiox_cli import embedding
    from raiox_cli.images import parse_crop

    region = parse_crop(crop) if crop is not None else None
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
        note(f"{failure.path}: {failure.reason}")
    if out_file is not None:
        import numpy as np  # start-up time: only --out needs it

        vectors = [d.vector for d in done]
        np.save(out_file, np.stack(vectors) if vectors else np.empty((0, embedder.dim)))
        err.print(
            f"wrote {len(done)} embeddings ({embedder.model_id}) to {out_file}", highlight=False
        )
    else:
        for item in done:
            print_json(
                {
                    "path": item.path,
                    "model_id": embedder.model_id,
                    "embedding": item.vector.tolist(),
                }
            )
    if failed:
        raise typer.Exit(1)
