"""Confirmations, export-labels and eval --confirmed through the real CLI and the
embedded PostgreSQL (the HTTP side is in tests/server/test_feedback.py)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.cli import app
from raiox_cli.clinics import feedback
from raiox_cli.db import queries
from raiox_cli.store import objects as storage
from raiox_cli.training import synth

runner = CliRunner()


@dataclass
class Analysed:
    info: synth.SynthInfo
    ids: list[int]  # one saved analysis per query file, in order
    ranked: list[list[str]]  # the implant keys raiox answered for each
    truth: list[str]  # the implant each query really shows


@pytest.fixture
def analysed(migrated: config.Settings, tmp_path: Path) -> Analysed:
    """A synthetic catalogue ingested with `raiox ingest` and three X-rays analysed
    with `raiox search --save` (their bytes kept in the local image store)."""
    info = synth.make_catalogue(tmp_path / "synth", systems=4, views=2, queries=1, size=(96, 120))
    result = runner.invoke(app, ["ingest", str(info.catalogue)])
    assert result.exit_code == 0, result.output
    ids, ranked, truth = [], [], []
    for query in info.query_files[:3]:
        result = runner.invoke(
            app, ["search", str(query), "--save", "--client-id", "clinic-a", "--json"]
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        ids.append(data["analysis_id"])
        ranked.append([m["key"] for m in data["matches"]])
        truth.append(info.label_of(query))
    return Analysed(info, ids, ranked, truth)


def confirm(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["confirm", *args])
    return result.exit_code, result.stdout, result.stderr


def public_id(settings: config.Settings, analysis: int) -> str:
    with db.connect(settings) as conn:
        row = queries.get_analysis(conn, analysis)
        assert row is not None
        return str(row["public_id"])


def count_confirmations(settings: config.Settings) -> int:
    with db.connect(settings) as conn:
        row = conn.execute("SELECT count(*) FROM confirmations").fetchone()
        return int(row[0]) if row else 0


def test_confirm_twice_keeps_history_and_the_latest_wins(
    analysed: Analysed, migrated: config.Settings
) -> None:
    analysis = analysed.ids[0]
    first_key, listed = analysed.ranked[0][0], analysed.ranked[0]
    code, out, err = confirm(str(analysis), first_key, "--client-id", "dr-ana", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["analysis_id"] == public_id(migrated, analysis)
    assert first["implant"]["key"] == first_key
    assert first["raiox_rank"] == 1 and first["client_id"] == "dr-ana"
    assert first["not_in_catalogue"] is False and first["previous"] is None

    # Any catalogue implant, not only the listed ones, by its short spelling in any case.
    other = next(i for i in analysed.info.implants if i.key not in listed)
    short = f"{other.design.manufacturer.upper()}/{other.design.name}"
    code, out, err = confirm(str(analysis), short, "--note", "  surgical report  ")
    assert code == 0, err
    assert f"analysis {analysis} confirmed: {other.key}" in out
    assert "raiox did not list it" in out and "replaces the answer of" in out and first_key in out

    with db.connect(migrated) as conn:
        history = feedback.history(conn, analysis)
        assert [c.implant["key"] for c in history] == [other.key, first_key]
        assert history[0].note == "surgical report" and history[0].raiox_rank is None
        assert feedback.latest(conn, analysis).id == history[0].id
        latest = queries.latest_confirmations(conn)
        assert [(r["analysis_id"], r["implant_key"]) for r in latest] == [(analysis, other.key)]

    # The public id (what the API and the pages use) names the same analysis.
    code, out, err = confirm(public_id(migrated, analysis), "--not-in-catalogue", "--json")
    assert code == 0, err
    third = json.loads(out)
    assert third["implant"] is None and third["not_in_catalogue"] is True
    assert third["previous"]["implant"]["key"] == other.key
    assert count_confirmations(migrated) == 3


def test_confirm_names_the_implant_readably_and_suggests_for_far_off_keys(
    analysed: Analysed,
) -> None:
    analysis = str(analysed.ids[0])
    implant = next(i for i in analysed.info.implants if i.key == analysed.truth[0])
    code, out, err = confirm(analysis, implant.key)
    assert code == 0, err
    assert f"({implant.design.name}, {implant.design.manufacturer});" in out
    # Far off by spelling, but it still names the maker: suggest that maker's implants.
    code, _, err = confirm(analysis, f"{implant.design.manufacturer} no-such-model 9x99")
    assert code == 1
    assert f"did you mean {implant.key!r}" in err
    assert "raiox implants --search TEXT" in err and "GET /implants" not in err
    code, _, err = confirm(analysis, "zzzz")
    assert code == 1 and "did you mean" not in err and "raiox implants --search" in err


def test_confirm_refuses_bad_input_and_records_nothing(
    analysed: Analysed, migrated: config.Settings
) -> None:
    analysis = str(analysed.ids[0])
    key = analysed.truth[0]
    code, _, err = confirm(analysis, key[:-2])
    assert code == 1
    assert f"no implant {key[:-2]!r} in the catalogue; did you mean {key!r}" in err
    code, _, err = confirm("999999", key)
    assert code == 1 and "no analysis 999999" in err
    code, _, err = confirm("00000000-0000-4000-8000-000000000000", key)
    assert code == 1 and "no analysis 00000000-0000-4000-8000-000000000000" in err
    code, _, err = confirm("42abc", key)
    assert code == 1 and "not an analysis id" in err
    code, _, err = confirm(analysis)
    assert code == 2 and "--not-in-catalogue" in err
    code, _, err = confirm(analysis, key, "--not-in-catalogue")
    assert code == 2 and "not both" in err
    code, _, err = confirm(analysis, key, "--note", "x" * 2001)
    assert code == 2 and "note is 2001 characters long; at most 2000" in err
    code, _, err = confirm(analysis, "   ")
    assert code == 2 and "implant key is empty" in err
    with db.connect(migrated) as conn:
        pending, _ = queries.create_analysis(conn, source="webhook", image_url="https://x/y.png")
        conn.commit()
    code, _, err = confirm(str(pending), key)
    assert code == 1 and f"analysis {pending} cannot be confirmed: it is still pending" in err
    assert count_confirmations(migrated) == 0


def test_export_labels_writes_what_eval_reads(
    analysed: Analysed, migrated: config.Settings, tmp_path: Path
) -> None:
    right, outside, unconfirmed = analysed.ids
    assert confirm(str(right), analysed.ranked[0][1])[0] == 0  # changed answer: latest wins
    assert confirm(str(right), analysed.truth[0])[0] == 0
    assert confirm(str(outside), "--not-in-catalogue", "--note", "Helix GM")[0] == 0

    out = tmp_path / "labels"
    result = runner.invoke(app, ["export-labels", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exported"] == 1 and report["implants"] == 1
    assert report["not_in_catalogue"] == 1 and report["failed"] == []

    with (out / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["expected_key"], r["analysis_id"]) for r in rows] == [
        (analysed.truth[0], public_id(migrated, right))
    ]
    exported = out / rows[0]["path"]
    query = analysed.info.query_files[0]
    assert exported.read_bytes() == query.read_bytes()  # the stored X-ray, byte for byte
    assert exported.parent.parent.parent == out and exported.suffix == ".png"
    with (out / "not-in-catalogue.csv").open() as fh:
        others = list(csv.DictReader(fh))
    assert [(r["analysis_id"], r["note"]) for r in others] == [
        (public_id(migrated, outside), "Helix GM")
    ]
    assert (out / others[0]["path"]).parent == out / "not-in-catalogue"
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert len(written) == 4  # two X-rays, two CSVs: nothing of the unconfirmed one
    assert not any(public_id(migrated, unconfirmed) in name for name in written)

    for source in (out, out / "labels.csv"):  # the folder layout and the CSV
        result = runner.invoke(app, ["eval", str(source), "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["queries"] == 1 and data["skipped"] == []
        assert data["top1"] == (1.0 if analysed.ranked[0][0] == analysed.truth[0] else 0.0)

    # The data layer adapt trains from: the same labelled X-ray, readable from the store.
    with db.connect(migrated) as conn:
        images = queries.confirmed_query_images(conn)
    assert [(r["implant_key"], r["analysis_id"]) for r in images] == [(analysed.truth[0], right)]
    data = storage.open_store(migrated).get(images[0]["storage_key"])
    assert hashlib.sha256(data).hexdigest() == images[0]["image_sha256"]

    again = runner.invoke(app, ["export-labels", str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.stderr


# --- eval --confirmed on analyses with known answers ---------------------------------

IMPLANTS = {
    "a": ("Acme", "Alpha"),
    "b": ("Acme", "Beta"),
    "c": ("Bolt", "Gamma"),
    "d": ("Bolt", "Delta"),
}


def _key(letter: str) -> str:
    manufacturer, name = IMPLANTS[letter]
    return f"{manufacturer.lower()}//{name.lower()}"


def _analysis(
    conn: psycopg.Connection,
    ids: dict[str, int],
    ranked: str,
    scores: list[float],
    *,
    month: str,
    client: str = "clinic-a",
) -> int:
    analysis, _ = queries.create_analysis(conn, source="cli", client_id=client, status="running")
    matches = [
        SimpleNamespace(rank=i + 1, implant_id=ids[k], image_id=None, key=_key(k), score=s)
        for i, (k, s) in enumerate(zip(ranked, scores, strict=True))
    ]
    queries.finish_analysis(conn, analysis, model_id="raiox-tiny:none", matches=matches)
    conn.execute(
        "UPDATE analyses SET created_at = %(t)s WHERE id = %(a)s",
        {"t": datetime.fromisoformat(f"{month}-15T12:00:00+00:00"), "a": analysis},
    )
    return analysis


@pytest.fixture
def answered(conn: psycopg.Connection) -> dict[str, int]:
    """Six confirmed analyses (and one unconfirmed) whose metrics are known by hand."""
    ids = {
        letter: queries.upsert_implant(
            conn, {"key": _key(letter), "name": name, "manufacturer": manufacturer}
        )
        for letter, (manufacturer, name) in IMPLANTS.items()
    }
    made = {
        "right": _analysis(conn, ids, "abc", [0.9, 0.8, 0.7], month="2026-01"),
        "second": _analysis(conn, ids, "bac", [0.6, 0.5, 0.4], month="2026-01"),
        "right-low": _analysis(conn, ids, "cba", [0.45, 0.4, 0.3], month="2026-02"),
        "changed": _analysis(conn, ids, "bca", [0.3, 0.2, 0.1], month="2026-02"),
        "outside": _analysis(conn, ids, "abc", [0.95, 0.5, 0.4], month="2026-02"),
        "unlisted": _analysis(conn, ids, "abc", [0.7, 0.6, 0.5], month="2025-12", client="b"),
        "unconfirmed": _analysis(conn, ids, "abc", [0.9, 0.1, 0.1], month="2026-02"),
    }
    for name, key in [
        ("right", "a"),
        ("second", "a"),
        ("right-low", "c"),
        ("changed", "a"),
        ("changed", "b"),  # changed their mind: b, which raiox ranked first
        ("unlisted", "d"),
    ]:
        feedback.confirm(conn, made[name], _key(key), client_id="dr-ana")
    feedback.confirm(conn, made["outside"], None, note="Helix")
    conn.commit()
    return made


def eval_confirmed(*args: str) -> dict:
    result = runner.invoke(app, ["eval", "--confirmed", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_confirmed_counts_the_answers_raiox_gave(
    answered: dict[str, int], migrated: config.Settings
) -> None:
    every = eval_confirmed("--min-score", "0.5")
    assert every["analyses"] == 5 and every["not_in_catalogue"] == 1
    # ranks 1, 2, 1, 1 (latest answer wins), none (d was not listed)
    assert every["top1"] == pytest.approx(3 / 5) and every["top3"] == pytest.approx(4 / 5)
    assert every["top5"] == pytest.approx(4 / 5) and every["mrr"] == pytest.approx(3.5 / 5)
    assert every["depth"] == 3 and every["models"] == {"raiox-tiny:none": 5}

    since = eval_confirmed("--since", "2026-01-01", "--min-score", "0.5")
    assert since["analyses"] == 4 and since["since"].startswith("2026-01-01T00:00:00")
    assert since["top1"] == pytest.approx(0.75) and since["top3"] == 1.0
    assert since["mrr"] == pytest.approx(3.5 / 4)
    assert since["confused"] == [{"expected": _key("a"), "predicted": _key("b"), "count": 1}]
    months = {m["month"]: (m["analyses"], m["top1"], m["mrr"]) for m in since["by_month"]}
    assert months == {"2026-01": (2, 0.5, 0.75), "2026-02": (2, 1.0, 1.0)}
    makers = {m["manufacturer"]: (m["analyses"], m["top1"]) for m in since["by_manufacturer"]}
    assert makers == {"Acme": (3, pytest.approx(2 / 3)), "Bolt": (1, 1.0)}
    assert since["min_score"] == 0.5
    assert since["under_min_score"]["right"] == {"under": 2, "of": 3, "rate": pytest.approx(2 / 3)}
    assert since["under_min_score"]["wrong"] == {"under": 0, "of": 1, "rate": 0.0}
    assert since["under_min_score"]["not_in_catalogue"]["under"] == 0
    assert since["scores_right"] == pytest.approx([0.3, 0.45, 0.9])
    assert [f["analysis_id"] for f in since["failures"]] == [
        public_id(migrated, answered["second"])
    ]
    assert since["failures"][0]["rank"] == 2

    other = eval_confirmed("--client", "b")
    assert other["analyses"] == 1 and other["top1"] == 0.0 and other["mrr"] == 0.0
    assert other["failures"][0]["rank"] is None
    assert other["by_manufacturer"] == [
        {"manufacturer": "Bolt", "analyses": 1, "top1": 0.0, "top3": 0.0, "top5": 0.0, "mrr": 0.0}
    ]


def test_eval_confirmed_table_and_refusals(answered: dict[str, int]) -> None:
    result = runner.invoke(app, ["eval", "--confirmed", "--min-score", "0.5"])
    assert result.exit_code == 0, result.output
    for text in (
        "confirmed analyses",
        "per month",
        "2026-02",
        "per manufacturer",
        "Bolt",
        "1 confirmed as not in the catalogue",
        "best score under --min-score 0.5 when right: 2 of 3 (67%)",
        "most confused",
    ):
        assert text in result.stdout, text
    nobody = runner.invoke(app, ["eval", "--confirmed", "--client", "nobody"])
    assert nobody.exit_code == 1
    assert "no confirmed analysis from client 'nobody'" in nobody.stderr
    assert runner.invoke(app, ["eval"]).exit_code == 2
    both = runner.invoke(app, ["eval", "somewhere", "--confirmed"])
    assert both.exit_code == 2 and "one of them" in both.stderr
    stray = runner.invoke(app, ["eval", "somewhere", "--since", "2026-01-01"])
    assert stray.exit_code == 2 and "go with --confirmed" in stray.stderr
    bad_date = runner.invoke(app, ["eval", "--confirmed", "--since", "last week"])
    assert bad_date.exit_code == 2


def test_confirmed_query_images_filters_and_keeps_the_latest(
    answered: dict[str, int], conn: psycopg.Connection
) -> None:
    # None of these analyses stored an X-ray: nothing to train on, nothing to export.
    assert queries.confirmed_query_images(conn) == []
    conn.execute(
        "UPDATE analyses SET image_sha256 = %(s)s, storage_key = %(k)s",
        {"s": "ab" * 32, "k": storage.object_key("ab" * 32)},
    )
    rows = queries.confirmed_query_images(conn)
    # One row per (implant, X-ray): the same bytes confirmed a, b, c and d.
    assert sorted(r["implant_key"] for r in rows) == sorted(_key(k) for k in "abcd")
    since = queries.confirmed_query_images(
        conn, since=datetime(2026, 2, 1, tzinfo=timezone.utc), client="clinic-a"
    )
    assert sorted(r["implant_key"] for r in since) == [_key("b"), _key("c")]
    assert {r["analysis_id"] for r in since} == {answered["right-low"], answered["changed"]}


def test_a_clinic_confirms_only_its_own_analyses(
    answered: dict[str, int], conn: psycopg.Connection
) -> None:
    from raiox_cli.clinics import keys as clients

    mine, _ = clients.add(conn, "sorriso-sp")
    theirs, _ = clients.add(conn, "outra-clinica")
    conn.execute(
        "UPDATE analyses SET clinic_id = %(c)s WHERE id = %(a)s",
        {"c": mine["id"], "a": answered["unconfirmed"]},
    )
    analysis = queries.get_analysis(conn, answered["unconfirmed"])
    for other in (analysis["public_id"], answered["unconfirmed"]):  # by UUID or number
        with pytest.raises(feedback.UnknownAnalysis, match="no analysis"):
            feedback.confirm(conn, other, _key("a"), clinic_id=theirs["id"])
    done = feedback.confirm(conn, analysis["public_id"], _key("a"), clinic_id=mine["id"])
    assert done.analysis_id == str(analysis["public_id"]) and done.raiox_rank == 1
    conn.commit()
    # --client names a clinic (or the client id its sender labelled analyses with).
    result = runner.invoke(app, ["eval", "--confirmed", "--client", "sorriso-sp", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["analyses"] == 1
