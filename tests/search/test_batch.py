"""Batch identification: `raiox search` over many X-rays equals one search per X-ray,
reports bad files and goes on, resumes after kill -9, and batches its database
queries through the model's HNSW index."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from raiox_cli import analyses, config
from raiox_cli.cli import app
from raiox_cli.db import queries
from raiox_cli.search import query as search
from raiox_cli.training import synth
from tests.helpers.catalogue import store_synthetic_catalogue

runner = CliRunner()


@pytest.fixture
def catalogue(conn, tiny_embedder, tmp_path: Path) -> synth.SynthInfo:
    info = synth.make_catalogue(tmp_path / "synth", systems=6, views=3, queries=2, size=(96, 120))
    store_synthetic_catalogue(conn, tiny_embedder, info)
    return info


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_batch_equals_single_searches_and_bad_files_are_reported(
    migrated: config.Settings, catalogue: synth.SynthInfo, tmp_path: Path
) -> None:
    folder = tmp_path / "xrays"
    shutil.copytree(catalogue.queries_dir, folder)
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.dcm").write_bytes(b"")
    (folder / ".hidden.png").write_text("skipped: hidden")
    result = runner.invoke(app, ["search", str(folder), "-k", "3", "--batch-size", "4"])
    assert result.exit_code == 1, result.output
    failures = {
        line.split(": ", 1)[0]: line
        for line in result.stderr.splitlines()
        if line.startswith(str(folder))
    }
    assert set(failures) == {str(folder / "notes.png"), str(folder / "empty.dcm")}
    assert "not a supported image" in failures[str(folder / "notes.png")]
    answers = _lines(result.stdout)
    queries_found = sorted(str(p) for p in folder.rglob("*.png") if not p.name.startswith("."))
    queries_found.remove(str(folder / "notes.png"))
    assert [a["path"] for a in answers] == queries_found  # input order, every good one
    assert f"{len(answers)} answered" in result.stderr and "2 failed" in result.stderr
    for answer in answers:
        single = analyses.search_file(migrated, Path(answer["path"]), k=3)
        expected = search.result_json(answer["path"], 3, single)
        got = {key: value for key, value in answer.items() if key not in ("path", "sha256")}
        assert [m["implant_id"] for m in got.pop("matches")] == [
            m["implant_id"] for m in expected.pop("matches")
        ]
        assert got == expected
        for mine, theirs in zip(answer["matches"], single.matches, strict=True):
            assert mine["score"] == pytest.approx(theirs.score, abs=1e-5)
            assert mine["orientation"] == theirs.orientation
            assert mine["image_id"] == theirs.image_id


def test_one_statement_answers_many_queries_through_the_index(conn, tiny_embedder, catalogue):
    model = queries.active_model(conn)
    vectors = tiny_embedder.embed_images(
        [search.load_query(p, config.resolve()).image for p in catalogue.query_files[:5]]
    )
    search._configure(conn, 100)
    plan = queries.explain_nearest_many(conn, model, vectors, k=4, candidates=100)
    assert model.index_name in plan and "Seq Scan on image_embeddings" not in plan
    many = queries.nearest_implants_many(conn, model, vectors, k=4, candidates=100)
    for vector, (rows, fetched) in zip(vectors, many, strict=True):
        one, one_fetched = queries.nearest_implants(conn, model, vector, k=4, candidates=100)
        assert [r["id"] for r in rows] == [r["id"] for r in one] and fetched == one_fetched
    conn.rollback()
    # Growing and the exact fallback answer per query, as one search does: a k larger
    # than the catalogue needs the exact scan.
    for (rows, exact), vector in zip(
        search.nearest_implant_rows_many(conn, model, vectors, k=8), vectors, strict=True
    ):
        one, one_exact = search.nearest_implant_rows(conn, model, vector, k=8)
        assert [r["id"] for r in rows] == [r["id"] for r in one] and exact == one_exact


def test_from_list_csv_and_save_resume(
    migrated: config.Settings, catalogue: synth.SynthInfo, tmp_path: Path, conn
) -> None:
    listing = tmp_path / "list.csv"
    chosen = catalogue.query_files[:4]
    rows = ["id,path"] + [f"{n},{p.relative_to(tmp_path)}" for n, p in enumerate(chosen)]
    listing.write_text("\n".join(rows) + "\n")
    out_csv = tmp_path / "answers.csv"
    args = ["search", "--from", str(listing), "--csv", str(out_csv), "--save", "-k", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == ""  # answers went to the file
    table = list(csv.DictReader(out_csv.open()))
    assert len(table) == 4 * 2 and {r["path"] for r in table} == {str(p) for p in chosen}
    assert all(r["analysis_id"] for r in table)
    saved = conn.execute("SELECT count(*) FROM analyses WHERE source = 'cli'").fetchone()[0]
    assert saved == 4
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "4 already answered" in again.stderr
    assert len(list(csv.DictReader(out_csv.open()))) == 8
    conn.commit()
    assert conn.execute("SELECT count(*) FROM analyses WHERE source = 'cli'").fetchone()[0] == 4


@pytest.mark.slow
def test_kill_9_then_rerun_equals_a_clean_run(
    migrated: config.Settings, catalogue: synth.SynthInfo, tmp_path: Path
) -> None:
    folder = tmp_path / "many"
    for n in range(4):  # 48 X-rays
        shutil.copytree(catalogue.queries_dir, folder / str(n))
    total = len(list(folder.rglob("*.png")))
    out = tmp_path / "resumed.jsonl"
    command = [sys.executable, "-m", "raiox_cli", "search", str(folder), "--no-tta"]
    slow = [*command, "--out", str(out), "--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen(slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    with out.open("ab") as fh:
        fh.write(b'{"path": "cut short by the kil')  # as if killed mid-write
    done_before = len(_lines(out.read_text().rsplit("\n", 1)[0]))
    assert 3 <= done_before < total
    resumed = subprocess.run(
        [*slow[:-4]], capture_output=True, text=True, timeout=180, env=os.environ
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} already answered" in resumed.stderr
    clean_out = tmp_path / "clean.jsonl"
    clean = subprocess.run(
        [*command, "--out", str(clean_out)], capture_output=True, text=True, timeout=180
    )
    assert clean.returncode == 0, clean.stderr
    got, want = _lines(out.read_text()), _lines(clean_out.read_text())
    assert [a["path"] for a in got] == [a["path"] for a in want] and len(got) == total
    for a, b in zip(got, want, strict=True):
        assert [m["implant_id"] for m in a["matches"]] == [m["implant_id"] for m in b["matches"]]
        np.testing.assert_allclose(
            [m["score"] for m in a["matches"]], [m["score"] for m in b["matches"]], atol=1e-5
        )
