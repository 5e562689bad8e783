from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from raiox_cli.cli import app
from raiox_cli.search import sheet

runner = CliRunner()


@pytest.mark.slow
def test_demo_runs_end_to_end_then_reuses_everything(raiox_env, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--out", str(out), "--systems", "3"])
    assert first.exit_code == 0, first.output
    assert "generated" in first.stderr and "meaningless" in first.stderr
    assert "ingest: 12 new" in first.stderr  # 3 systems x 4 views
    assert first.stdout.count("should be") == 3  # three result tables
    for word in ("top-1", "MRR", "What to do next", "raiox ingest"):
        assert word in first.stdout
    with Image.open(out / "contact-sheet.png") as img:
        assert img.format == "PNG" and img.size == sheet.sheet_size(3)
    assert (out / "catalogue" / "catalogue.csv").is_file()

    drawn = (out / "demo.json").stat().st_mtime_ns
    second = runner.invoke(app, ["demo", "--out", str(out), "--systems", "3"])
    assert second.exit_code == 0, second.output
    assert "reused" in second.stderr and "0 new, 0 updated, 12 unchanged" in second.stderr
    assert (out / "demo.json").stat().st_mtime_ns == drawn


def test_demo_offline_without_weights_stops_fast(raiox_env, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAIOX_MODEL", "ViT-B-32")
    monkeypatch.setenv("RAIOX_PRETRAINED", "laion2b_s34b_b79k")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    started = time.monotonic()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 4, result.output
    assert time.monotonic() - started < 15
    assert "--pretrained none" in result.stderr and "RAIOX_WEIGHTS" in result.stderr
    assert not (tmp_path / "demo").exists()  # stopped before drawing anything


@pytest.mark.slow
def test_demo_names_each_search_by_its_own_query_and_warns_once(raiox_env, tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--systems", "3"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.split())  # a long title wraps at spaces
    queries = sorted((tmp_path / "demo" / "queries").rglob("*.png"))
    assert len({q.name for q in queries}) < len(queries)  # file names repeat per implant
    titled = [
        q for q in queries if f"{q.relative_to(tmp_path / 'demo' / 'queries')}: should be" in flat
    ]
    assert len(titled) == 3  # each search by its own path, not three times "q_00.png"
    assert result.stderr.count("meaningless") == 1  # random weights, said once
