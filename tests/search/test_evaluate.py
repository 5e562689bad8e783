from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raiox_cli.cli import app
from raiox_cli.search import evaluate
from raiox_cli.training import synth

runner = CliRunner()


@pytest.fixture
def ingested(raiox_env, tmp_path: Path) -> synth.SynthInfo:
    """A synthetic catalogue ingested through the real `raiox ingest`."""
    info = synth.make_catalogue(tmp_path / "synth", systems=5, views=2, queries=2, size=(96, 120))
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    result = runner.invoke(app, ["ingest", str(info.catalogue)])
    assert result.exit_code == 0, result.output
    return info


def test_catalogue_images_as_queries_score_perfectly(ingested) -> None:
    result = runner.invoke(app, ["eval", str(ingested.catalogue), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["queries"] == len(ingested.catalogue_files)
    assert report["top1"] == report["top5"] == report["mrr"] == 1.0
    assert report["failures"] == [] and report["confused"] == []
    assert report["scores_right"][0] == pytest.approx(1.0, abs=1e-4)  # min over planted images
    assert report["scores_wrong"] == []


def test_eval_queries_folder_metrics_are_consistent(ingested) -> None:
    result = runner.invoke(app, ["eval", str(ingested.queries_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    n = len(ingested.query_files)
    assert report["queries"] == n and report["model_id"] == "raiox-tiny:none"
    assert 0 <= report["top1"] <= report["top3"] <= report["top5"] <= 1
    assert report["top1"] <= report["mrr"] <= 1
    assert len(report["failures"]) == round(n * (1 - report["top1"]))
    for failure in report["failures"]:
        assert failure["expected_key"] == ingested.label_of(Path(failure["path"]))
        assert failure["rank"] != 1
    assert sum(pair["count"] for pair in report["confused"]) <= len(report["failures"])


def test_eval_table(ingested) -> None:
    result = runner.invoke(app, ["eval", str(ingested.queries_dir), "--tta"])
    assert result.exit_code == 0, result.output
    for word in ("top-1", "top-3", "top-5", "MRR", "tta"):
        assert word in result.stdout


def test_eval_csv_with_short_labels_and_unknown_ones(ingested, tmp_path: Path) -> None:
    first, second = ingested.implants[0], ingested.implants[1]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "path,expected_key\n"
        f"{first.views[0]},{first.key}\n"
        f"{second.views[1]},{second.design.manufacturer.upper()}/{second.design.name}\n"
        f"{second.views[0]},nobody/unknown implant\n"
    )
    labelled = evaluate.labelled_queries(csv_path)
    assert labelled[0].label == first.key and labelled[0].path == first.views[0]
    result = runner.invoke(app, ["eval", str(csv_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["queries"] == 2 and data["top1"] == 1.0
    assert [s["label"] for s in data["skipped"]] == ["nobody/unknown implant"]
    assert "names no implant" in result.stderr


def test_eval_without_labelled_queries_is_a_usage_error(ingested, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["eval", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no labelled queries" in result.stderr
