"""Output: results on stdout (tables, or JSON with --json), progress and warnings on
stderr. The only place that prints; command modules keep their own small tables."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True)  # results: stdout
err = Console(stderr=True, soft_wrap=True)  # progress, logs, warnings: stderr


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    """One result line on stdout, as written (no markup, no highlighting)."""
    out.print(text, highlight=False)


def prose(text: str) -> None:
    """A sentence on stdout, folded at the terminal's width between words (80 columns
    must not cut one); data lines (keys, paths, JSON) are never folded."""
    out.print(text, highlight=False, markup=False, soft_wrap=False)


def note(text: str) -> None:
    """One line on stderr, as written."""
    err.print(text, markup=False, highlight=False)


def warn(notes: Iterable[str]) -> None:
    for text in notes:
        err.print(f"warning: {text}", style="yellow", markup=False, highlight=False)


def print_failures(failures: Iterable[Any]) -> None:
    for failure in failures:
        note(str(failure))


def key_value_table(rows: Iterable[tuple[str, str]], *, title: str, header: str) -> Table:
    table = Table(title=title)
    table.add_column(header)
    table.add_column("count", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


@contextlib.contextmanager
def progress_bar(force: bool) -> Iterator[Callable[[str, int, int], None] | None]:
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


def print_matches(title: str, result: Any) -> None:
    """One search's implants, best first (raiox search, raiox demo). A table one row per
    implant when it fits the terminal; stacked (details under each name) when it does
    not, as at 80 columns. --json carries every field either way."""
    out.print(fitted(_matches_table(title, result), lambda: _stacked_matches_table(title, result)))
    if not result.matches:
        out.print("no implants found")
    for line in trust_lines(result):
        prose(line)
    if result.matches and not result.confident:
        prose(
            f"no confident match: best score {result.matches[0].score:.3f} is below "
            f"{result.min_score:g} (--min-score); treat the list as suggestions"
        )
    if result.analysis_id is not None:
        out.print(f"saved as analysis {result.analysis_id}")


def fitted(wide: Table, narrow: Callable[[], Table]) -> Table:
    """`wide` when it fits the terminal unwrapped, else the `narrow` layout (80 columns)."""
    unbounded = out.options.update_width(100_000)  # its natural width, not clipped to ours
    return wide if out.measure(wide, options=unbounded).maximum <= out.width else narrow()


def size_mm(diameter: float | None, length: float | None) -> str:
    return f"{diameter:g}x{length:g}" if diameter and length else ""


def _size(m: Any) -> str:
    return size_mm(m.diameter_mm, m.length_mm)


def _margin(m: Any) -> str:
    return "" if m.margin is None else f"{m.margin:.3f}"


def _matches_table(title: str, result: Any) -> Table:
    table = Table(title=title)
    for column in ("#", "implant", "manufacturer", "system", "size mm", "score", "margin"):
        table.add_column(column, justify="right" if column in {"score", "margin"} else "left")
    tta = len(result.orientations) > 1
    if tta:
        table.add_column("seen")
    for m in result.matches:
        row = [str(m.rank), m.name, m.manufacturer, m.system or "", _size(m), f"{m.score:.3f}"]
        table.add_row(*row, _margin(m), *([m.orientation] if tta else []))
    return table


def _stacked_matches_table(title: str, result: Any) -> Table:
    """Four columns: the implant's name, and under it manufacturer, system, size and
    the orientation that matched (when not the original)."""
    from rich.text import Text

    table = Table(title=title, show_lines=True)
    table.add_column("#")
    table.add_column("implant", ratio=1)
    table.add_column("score", justify="right")
    table.add_column("margin", justify="right")
    tta = len(result.orientations) > 1
    for m in result.matches:
        size = _size(m)
        details = [m.manufacturer, m.system or "", f"{size} mm" if size else ""]
        if tta and m.orientation != "original":
            details.append(f"seen {m.orientation}")
        cell = Text(m.name)
        cell.append("\n" + ", ".join(d for d in details if d), style="dim")
        table.add_row(str(m.rank), cell, f"{m.score:.3f}", _margin(m))
    return table


VERDICTS = {
    "strong": "strong match",
    "possible": "possible match",
    "none": "no confident match",
    "not_in_catalogue": "probably not in our catalogue",
}


def trust_lines(result: Any) -> list[str]:
    """The answer's trust fields in words (calibrate.Trust, shown as they are)."""
    trust = result.trust
    if trust is None or not result.matches:
        return []
    if not trust.calibrated:
        return [f"uncalibrated: {trust.reason}; the wording below is from fixed score thresholds"]
    top = result.matches[0]
    lines = [f"{VERDICTS[trust.verdict]}: {top.name}, {trust.probability:.0%} likely right"]
    n = len(trust.prediction_set)
    if n:
        names = ", ".join(trust.prediction_set)
        lines.append(f"with {trust.set_coverage:.0%} confidence it is one of these {n}: {names}")
    else:
        lines.append(f"no implant of the catalogue fits with {trust.set_coverage:.0%} confidence")
    if trust.out_of_catalogue:
        lines.append(
            f"out-of-catalogue score {trust.out_of_catalogue_score:.2f}: check the patient's "
            "records for the implant's brand; if it is not in the catalogue, confirm the "
            'analysis as "not in the catalogue" so raiox learns it'
        )
    return lines


def print_eval(report: Any, *, details: bool = True) -> None:
    """An evaluation on labelled queries (raiox eval, raiox demo)."""
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
            say(f"best score when {label}: min {low:.3f}, median {mid:.3f}, max {high:.3f}")
    if not details:
        return
    if report.confused:
        out.print(confused_table("most confused (expected -> ranked first)", report.confused))
    if report.failures:
        failures = Table(title="queries whose implant was not first")
        for column in ("query", "expected", "rank", "ranked first", "score"):
            failures.add_column(column)
        for o in report.failures:
            first, score = o.top[0] if o.top else ("", 0.0)
            rank = str(o.rank) if o.rank else f">{report.depth}"
            failures.add_row(o.path, o.expected_key or o.label, rank, first, f"{score:.3f}")
        out.print(failures)


def confused_table(title: str, pairs: list[dict[str, Any]], *, first: str = "expected") -> Table:
    second = "ranked first" if first == "expected" else "raiox answered"
    table = Table(title=title)
    for column in (first, second, "times"):
        table.add_column(column)
    for pair in pairs:
        table.add_row(pair["expected"], pair["predicted"], str(pair["count"]))
    return table
