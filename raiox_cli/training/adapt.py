"""`raiox adapt`: fine-tune the image tower on the catalogue and confirmed X-rays.

A recipe in five stages, one function each: data (labelled images, split into
training and held-out sets), model (the trainable tower embedding.py builds),
loop (multi-positive InfoNCE over P implants x K augmented views, AdamW, warm-up
+ cosine, gradient clipping, AMP on CUDA), evaluation (the ranking search does:
best image per implant, TTA orientations) and save (an open_clip safetensors
checkpoint of the image tower that --weights loads unchanged, and a model card beside it).

Every random choice comes from generators seeded by (--seed, step, sample), so a
run is reproducible on CPU and a resumed run draws the same batches. What must
survive a kill (weights, optimiser, best model, history, time spent) is one
checkpoint file, replaced atomically.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raiox_cli import db, embedding
from raiox_cli.catalogue import reindex
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import ModelMismatch
from raiox_cli.training.card import (
    CARD_FILE,
    WEIGHTS_FILE,
    check_out,
    finished_card,
    model_card,
    save_weights,
    write_card,
)
from raiox_cli.training.data import Data, Item, collect_data, load_pixels, split_data
from raiox_cli.training.loop import (
    STATE_FILE,
    RunState,
    Status,
    estimate_seconds,
    load_state,
    multi_positive_infonce,
    plan_steps,
    train,
    workers,
)
from raiox_cli.training.metrics import evaluate_embedder, evaluate_tower, rank_metrics, summary
from raiox_cli.training.model import build_tower, embedder_image_size
from raiox_cli.training.options import (
    AdaptOptions,
    NoTrainingData,
    RunMismatch,
    Seeds,
    fingerprint,
    validate,
)

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class AdaptReport:
    out: str
    base_model_id: str
    model_id: str | None = None
    weights: str | None = None
    card: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    dry_run: bool = False
    estimate_s: float | None = None
    planned_steps: int = 0
    resumed_from: int = 0
    current_model_id: str | None = None
    current: dict[str, Any] | None = None
    better: bool | None = None
    applied: bool = False
    refused: str | None = None
    reindex: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.refused is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_out(settings: Settings, fp: str) -> Path:
    return settings.home / "adapt" / fp[:12]


def adapt(
    settings: Settings,
    options: AdaptOptions,
    *,
    progress: Callable[[Status], None] | None = None,
) -> AdaptReport:
    """Train, or resume training, and write the checkpoint and model card; with
    --apply, switch the catalogue to the new model when it validates better."""
    validate(options)
    spec = embedding.ModelSpec.from_settings(settings)
    base_id = embedding.model_id(spec)
    seeds = Seeds(options.seed)
    with db.connect(settings) as conn:
        db.check_schema(conn)
        data = collect_data(conn, options, seeds.split())
        active = queries.active_model(conn)
    snapshot = data.snapshot()
    fp = fingerprint(base_id, snapshot, options)
    out = options.out or default_out(settings, fp)
    report = AdaptReport(str(out), base_id, data=snapshot, skipped=data.skipped)
    saved = check_out(out, fp)
    finished = finished_card(out, fp)
    if finished is not None and not options.dry_run:
        report.card, report.model_id = finished, finished["model_id"]
        report.weights = str(out / WEIGHTS_FILE)
        report.planned_steps = finished["training"]["planned_steps"]
        report.resumed_from = finished["training"]["steps"]
        return _compare_and_apply(settings, options, report, active, data, None)

    tower = build_tower(spec, options, options.seed)
    train_px, eval_px = load_pixels(data, settings, tower.image_size)
    report.data = data.snapshot()
    report.skipped = data.skipped
    total = plan_steps(data, options)
    report.planned_steps = total
    if options.dry_run:
        report.dry_run = True
        report.estimate_s = estimate_seconds(
            tower, data, train_px, eval_px, options, settings, seeds
        )
        return report

    state = RunState(**saved["state"]) if saved is not None else RunState(fp)
    if saved is not None:
        state.resumed += 1
        state.stopped = None if state.stopped == "max-minutes" else state.stopped
        report.resumed_from = state.step
    if state.before is None:
        state.before = evaluate_tower(tower, data, eval_px, tta=settings.tta)
    clock = time.perf_counter()
    best = train(
        tower,
        data,
        train_px,
        eval_px,
        options,
        state,
        saved,
        out,
        seeds=seeds,
        tta=settings.tta,
        workers=workers(settings),
        progress=progress,
    )
    weights = out / WEIGHTS_FILE
    save_weights(tower, best, weights)
    model_id = embedding.model_id(
        embedding.ModelSpec(spec.name, spec.pretrained, weights, settings.device)
    )
    card = model_card(
        fp=fp,
        model_id=model_id,
        base_id=base_id,
        architecture=spec.name,
        weights=weights,
        data=report.data,
        options=options,
        tower=tower,
        state=state,
        total=total,
        command_s=time.perf_counter() - clock,
        tta=settings.tta,
    )
    write_card(out / CARD_FILE, card)
    with contextlib.suppress(OSError):
        (out / STATE_FILE).unlink()  # finished: the card and the weights are the run now
    report.card, report.model_id, report.weights = card, model_id, str(weights)
    return _compare_and_apply(settings, options, report, active, data, eval_px)


def _current_spec(
    settings: Settings, active: queries.ModelRow, base: embedding.ModelSpec
) -> embedding.ModelSpec:
    if embedding.model_id(base) == active.model_id:
        return base
    name, _, tag = active.model_id.partition(":")
    if tag.startswith("file:"):
        raise ModelMismatch(
            f"the catalogue's model {active.model_id} was loaded from a local file; to compare "
            f"against it, train from it (RAIOX_MODEL={name} RAIOX_WEIGHTS=that file) or pass "
            "--force to apply without the comparison"
        )
    return embedding.ModelSpec(name, tag, None, settings.device)


def _compare_and_apply(
    settings: Settings,
    options: AdaptOptions,
    report: AdaptReport,
    active: queries.ModelRow | None,
    data: Data,
    eval_px: dict[str, Image.Image] | None,
) -> AdaptReport:
    """--apply: the new model must beat the catalogue's current model on the same
    validation splits (pooled MRR), unless --force."""
    if not options.apply or report.card is None:
        return report
    card = report.card
    after = card["metrics"]["after"]
    if active is None:
        current = None
    elif active.model_id == card["base_model_id"]:
        current = card["metrics"]["before"]
    elif active.model_id == report.model_id:
        report.current_model_id = active.model_id  # already the catalogue's model
        return report
    elif options.force:
        current = None
    else:
        base = embedding.ModelSpec.from_settings(settings)
        embedder = embedding.load_embedder(_current_spec(settings, active, base))
        if eval_px is None:
            _, eval_px = load_pixels(data, settings, embedder_image_size(embedder))
        current = evaluate_embedder(embedder, data, eval_px, tta=settings.tta)
    report.current_model_id = active.model_id if active else None
    report.current = current
    if current is not None:
        report.better = (after["all"]["mrr"] or 0) > (current["all"]["mrr"] or 0)
    if current is not None and not after["all"]["n"] and not options.force:
        report.refused = (
            "nothing to validate on, so nothing shows the adapted model beats the "
            f"catalogue's {active.model_id if active else 'model'}: give --val-labels, or "
            "--holdout-implants above 0; not applied (--force applies it anyway)"
        )
        return report
    if current is not None and not report.better and not options.force:
        report.refused = (
            f"the adapted model does not beat the catalogue's {active.model_id} on the "
            f"validation splits: {summary(after)} vs {summary(current)}; not applied "
            "(--force applies it anyway)"
        )
        return report
    target = settings.replace(
        model=card["architecture"], weights=Path(report.weights or ""), pretrained="file"
    )
    result = reindex.reindex(target, switch=True)
    report.reindex = result.to_dict()
    report.applied = result.switched
    if not result.ok:
        report.refused = "; ".join(f"{f.path}: {f.reason}" for f in result.failed)
    return report


# The stages' public names, also reachable as adapt.X (the CLI and the tests use them so)
__all__ = [
    "AdaptOptions",
    "AdaptReport",
    "Data",
    "Item",
    "NoTrainingData",
    "RunMismatch",
    "Status",
    "adapt",
    "build_tower",
    "collect_data",
    "evaluate_embedder",
    "load_state",
    "multi_positive_infonce",
    "rank_metrics",
    "save_weights",
    "split_data",
]
