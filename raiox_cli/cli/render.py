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
    """One search's implants, best first (raiox search, raiox demo)."""
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
