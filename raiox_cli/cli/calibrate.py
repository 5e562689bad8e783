"""`raiox calibrate`: how far to trust an answer, fitted for the catalogue's model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import MODEL, JsonOut, Since, settings
from raiox_cli.cli.render import print_json, say, warn

app = group()


@command(app, "calibrate")
@settings(*MODEL)
def calibrate(
    target: Annotated[
        float,
        typer.Option(help="coverage of the prediction sets: 0.9 = the right implant 9 in 10"),
    ] = 0.9,
    source: Annotated[
        str,
        typer.Option(
            help="auto (labels if given, else confirmations when there are 100, else the "
            "catalogue), labels, confirmed or catalogue"
        ),
    ] = "auto",
    labels: Annotated[
        Path | None,
        typer.Option(
            help="labelled X-rays: <Manufacturer>/<Implant>/*.png or a CSV (raiox eval layout)",
            show_default=False,
        ),
    ] = None,
    since: Since = None,
    false_alarm: Annotated[
        float,
        typer.Option(help="share of catalogued implants flagged 'not in our catalogue', at most"),
    ] = 0.05,
    queries_n: Annotated[
        int,
        typer.Option("--queries", min=20, help="catalogue: augmented catalogue images to search"),
    ] = 400,
    show: Annotated[
        bool, typer.Option("--show", help="print the active model's calibration, fit nothing")
    ] = False,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta", help="as search will run [env RAIOX_TTA]", show_default=False
        ),
    ] = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
) -> None:
    """Fit, for the catalogue's model, a calibrated probability that the top answer
    is right, prediction sets that hold the right implant with --target coverage,
    and a "not in our catalogue" threshold at --false-alarm; stored in the database,
    applied by every search from then on. --show prints it with its own measurements.

    Sources: labelled X-rays (--labels), the dentists' confirmations, or on day one
    the catalogue itself (augmented images as X-rays; whole implants left out as
    X-rays of implants not in the catalogue). A model switch makes it stale; the
    nightly reindex refits it. Exit codes: 1 too little data or one implant, 2 bad
    --target/--source or labels naming unknown implants, 5/6 as search.
    Example: raiox calibrate --target 0.9 --labels ./labelled-xrays
    """
    # lazy: start-up time
    from raiox_cli.search import calibration_data as core

    if show:
        fitted = core.show(settings)
        print_json(fitted.to_dict()) if json_out else print_calibration(fitted)
        return
    report = core.calibrate_source(
        settings,
        target=target,
        false_alarm=false_alarm,
        source=source,
        labels=labels,
        since=since,
        queries_n=queries_n,
    )
    warn(report.notes)
    if json_out:
        print_json(report.to_dict())
    else:
        say(f"source: {report.calibration.source} ({report.why})")
        print_calibration(report.calibration)


def _pct(value: Any) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def print_calibration(fit: Any) -> None:
    state = f"STALE: {fit.stale_reason}" if fit.stale else "in use"
    say(f"calibration {fit.id} of {fit.model_id}, {fit.created_at:%Y-%m-%d %H:%M} UTC, {state}")
    counts = ", ".join(f"{k} {v}" for k, v in fit.counts.items() if v is not None)
    say(f"data: {fit.source}: {counts}; sha256 {fit.data_sha256[:16]}")
    m = fit.metrics.get("held_out_half")
    where = "fitted on one half, measured on the other"
    if not m:
        m, where = fit.metrics.get("in_sample") or {}, "measured on the data it was fitted on"
    lines = [
        f"measured ({where}): {m.get('queries')} queries, top-1 {_pct(m.get('top1'))}",
        f"  probability: ECE {_num(m.get('ece'))} (raw score as a probability: "
        f"{_num(m.get('ece_raw_score'))}), Brier {_num(m.get('brier'))}",
        f"  prediction sets: coverage {_pct(m.get('coverage'))} for a target of "
        f"{_pct(fit.target)}, mean set size {_num(m.get('mean_set_size'))}, "
        f"empty {_pct(m.get('empty_sets'))}",
        f"  not in our catalogue: false alarms {_pct(m.get('false_alarm'))} (at most "
        f"{_pct(fit.false_alarm)}), AUROC {_num(m.get('ooc_auroc'))}, "
        f"FPR at 95% TPR {_pct(m.get('ooc_fpr_at_95tpr'))}",
    ]
    ooc = fit.params.get("ooc")
    if ooc is None:
        lines.append("  open-set statistic: the top score (fitted before the combined one)")
    else:
        cv = ooc.get("cross_validated_auroc") or {}
        lines.append(
            f"  open-set statistic: {ooc.get('chosen')} (held-out folds: AUROC logistic "
            f"{_num(cv.get('logistic'))}, top score {_num(cv.get('top score'))}); p-values "
            f"against {ooc.get('reference_queries')} queries it never saw"
        )
    for line in lines:
        say(line)
