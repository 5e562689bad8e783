"""raiox adapt: fine-tune the image tower on the catalogue and confirmed X-rays."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import JsonOut, ShowProgress, settings
from raiox_cli.cli.render import err, note, out, print_json, warn

app = group()


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
        "database); "
        + (
            f"{data['extra_images']} extra images ({data['extra_implants']} designs outside "
            "the catalogue, training only); "
            if data.get("extra_images")
            else ""
        )
        + "validation queries "
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


@command(app, "adapt")
@settings("workers", "device", "database_url", "model", "pretrained", "weights")
def adapt(
    labels: Annotated[
        Path | None,
        typer.Option(help="confirmed X-rays to train on: <Manufacturer>/<Implant>/* or a CSV"),
    ] = None,
    val_labels: Annotated[
        Path | None, typer.Option(help="labelled X-rays used only for validation")
    ] = None,
    extra_labels: Annotated[
        Path | None,
        typer.Option(
            help="labelled images of other implant designs (<Manufacturer>/<Implant>/* or a "
            "CSV), e.g. CAD renders: trained on so the model learns what tells designs apart, "
            "never searched; a label the catalogue has adds to that implant"
        ),
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
    augment: Annotated[
        str,
        typer.Option(
            help="radiograph (placement, exposure, neighbours) or xray (also a fresh bone "
            "texture, wider roots, more blur: closer to synthetic X-ray queries)"
        ),
    ] = "radiograph",
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
    *,
    settings: config.Settings,
) -> None:
    """Fine-tune the image tower on the catalogue (and confirmed X-rays), validate it
    before and after, and write an open_clip checkpoint with a model card.

    Killed, the same command resumes from its last checkpoint. --apply switches the
    catalogue through reindex only when the new model beats the current one on the
    same validation splits (else exit 1 with both results, unless --force).
    Example: raiox adapt --labels ./confirmed --max-minutes 60 --apply
    """
    # lazy: start-up time
    from raiox_cli.training import adapt as core

    options = core.AdaptOptions(
        train=train, blocks=blocks, epochs=epochs, steps=steps, batch_size=batch_size,
        views=views, lr=lr, temperature=temperature, seed=seed, augment=augment,
        holdout_implants=holdout_implants, eval_every=eval_every, patience=patience,
        labels=labels, val_labels=val_labels, extra_labels=extra_labels, confirmed=confirmed,
        max_minutes=max_minutes, out=out_dir, checkpoint_every=checkpoint_every,
        apply=apply, force=force, dry_run=dry_run,
    )  # fmt: skip
    with _train_bar(progress) as bar:
        report = core.adapt(settings, options, progress=bar)
    for skipped in report.skipped:
        note(f"skipped {skipped}")
    if report.data and not sum(report.data.get("validation_queries", {}).values()):
        warn(
            [
                "nothing to validate on: the last weights are kept and nothing measures "
                "them (give --val-labels, or --holdout-implants above 0)"
            ]
        )
    if json_out:
        print_json(report.to_dict())
    else:
        _print_adapt(report)
    if report.refused:
        err.print(f"raiox adapt: {report.refused}", style="red", markup=False, highlight=False)
        raise typer.Exit(1)
