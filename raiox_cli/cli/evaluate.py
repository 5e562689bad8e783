"""raiox eval: accuracy on labelled X-rays, or of the answers dentists confirmed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raiox_cli import config
from raiox_cli.cli.command import command, group
from raiox_cli.cli.options import MODEL, ClientFilter, JsonOut, Since, settings
from raiox_cli.cli.render import confused_table, note, out, print_eval, print_json, say
from raiox_cli.errors import UsageError

app = group()


@command(app, "eval")
@settings(*MODEL)
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
    unknown: Annotated[
        Path | None,
        typer.Option(
            help="X-rays of implants NOT in the catalogue (any folder of images): adds the "
            "open-set AUROC and the false-positive rate at 95% true-positive rate",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="write the calibration's reliability diagram and set-size histogram (PNG)",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOut = False,
    *,
    settings: config.Settings,
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

    With a calibration (raiox calibrate) both add how far its numbers hold: ECE
    (15 bins) and Brier of the probability, prediction-set coverage against its
    target and mean set size, out-of-catalogue false alarms; --confirmed per month.
    Example: raiox eval ./labelled-xrays --unknown ./other-brands --plot trust.png
    """
    # lazy: start-up time
    from raiox_cli.search import evaluate

    if confirmed == (queries is not None):
        raise UsageError("give QUERIES (labelled X-rays) or --confirmed, one of them")
    if not confirmed and (since or client or min_score is not None):
        raise UsageError("--since, --client and --min-score go with --confirmed")
    if confirmed and unknown is not None:
        raise UsageError("--unknown goes with QUERIES (confirmations say it themselves)")
    if queries is None:
        real = evaluate.evaluate_confirmed_source(settings, since=since, client=client)
        _plot(plot, (real.trust or {}).get("all"), "confirmed answers")
        if json_out:
            print_json(real.to_dict())
        else:
            _print_confirmed(real)
        return
    report = evaluate.evaluate_source(settings, queries, unknown)
    _plot(plot, report.trust, f"{queries} ({report.model_id})")
    for skipped in report.skipped:
        note(f"skipped {skipped.path}: {skipped.error}")
    if json_out:
        print_json(report.to_dict())
    else:
        print_eval(report)
        _print_trust(report.trust)


def _plot(path: Path | None, trust: dict[str, Any] | None, title: str) -> None:
    if path is None:
        return
    if not trust or not trust.get("reliability"):
        note(f"no plot: nothing calibrated to draw ({(trust or {}).get('reason', 'no answers')})")
        return
    # lazy: start-up time (matplotlib)
    from raiox_cli.search.plots import write_trust_plot

    note(f"plot: {write_trust_plot(trust, path, title=title)}")


def _fmt(value: Any, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _print_trust(trust: dict[str, Any] | None) -> None:
    if not trust:
        return
    if trust.get("unknown_queries"):
        say(
            f"not in the catalogue ({trust['unknown_queries']} X-rays): AUROC of the raw top "
            f"score {_fmt(trust['ooc_auroc_raw_score'])}, FPR at 95% TPR "
            f"{_fmt(trust['ooc_fpr_at_95tpr_raw_score'], '{:.1%}')}"
        )
    if not trust["calibrated"]:
        say(f"uncalibrated: {trust['reason']}")
        return
    say(
        f"calibration {trust['calibration_id']}: ECE {_fmt(trust['ece'])} (raw score "
        f"{_fmt(trust['ece_raw_score'])}), Brier {_fmt(trust['brier'])}; sets: coverage "
        f"{_fmt(trust['coverage'], '{:.1%}')} for {_fmt(trust['target'], '{:.0%}')}, mean size "
        f"{_fmt(trust['mean_set_size'], '{:.2f}')}; false alarms "
        f"{_fmt(trust['false_alarm'], '{:.1%}')}"
        + (
            f", AUROC {_fmt(trust['ooc_auroc'])}, FPR at 95% TPR "
            f"{_fmt(trust['ooc_fpr_at_95tpr'], '{:.1%}')}"
            if trust.get("ooc_auroc") is not None
            else ""
        )
    )


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
    say(
        f"{report.not_in_catalogue} confirmed as not in the catalogue (not counted above); "
        f"matches stored per analysis: at least {report.depth}"
        + (" (top-5 cannot see past them)" if report.depth < 5 else "")
    )
    for label, counts in report.under_min_score.items():
        if counts["of"]:
            say(
                f"best score under --min-score {report.min_score:g} when "
                f"{label.replace('_', ' ')}: {counts['under']} of {counts['of']} "
                f"({counts['rate']:.0%})"
            )
    if report.analyses:
        out.print(_accuracy_table("per month", "month", report.by_month, "month"))
        out.print(
            _accuracy_table(
                "per manufacturer", "manufacturer", report.by_manufacturer, "manufacturer"
            )
        )
    if report.trust:
        out.print(_trust_table(report.trust))
    if report.confused:
        title = "most confused (confirmed -> raiox answered)"
        out.print(confused_table(title, report.confused, first="confirmed"))


def _trust_table(trust: dict[str, Any]) -> Table:
    """Calibrated answers against the confirmations, per month."""
    table = Table(title="calibrated answers (what they said, against the confirmations)")
    for column in ("month", "answers", "top-1", "ECE", "Brier", "coverage", "mean set",
                   "false alarms", "detected"):  # fmt: skip
        table.add_column(column, justify="left" if column == "month" else "right")
    for row in [*trust["by_month"], {"month": "all", **trust["all"]}]:
        table.add_row(
            row["month"],
            str(row["analyses"]),
            _fmt(row["top1"], "{:.1%}"),
            _fmt(row["ece"]),
            _fmt(row["brier"]),
            _fmt(row["coverage"], "{:.1%}"),
            _fmt(row["mean_set_size"], "{:.2f}"),
            _fmt(row["false_alarm"], "{:.1%}"),
            _fmt(row["detected"], "{:.1%}"),
        )
    return table
