"""Calibration: coverage recovered on known score distributions, the command, its
errors, every CLI answer carrying the numbers, and staleness after a model switch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.cli import app
from raiox_cli.db import queries
from raiox_cli.search import calibrate, measures
from raiox_cli.search.calibrate import DEPTH, Sample
from raiox_cli.training import synth

runner = CliRunner()


# --- the statistics, on score distributions whose answer is known -------------------


def _samples(n: int, rng: np.random.Generator, *, outside: bool = False) -> list[Sample]:
    """Ranked lists of DEPTH + 1 implant scores: the right implant's score drawn
    higher than the others' (or absent, for X-rays of implants not in the catalogue)."""
    found = []
    for i in range(n):
        others = rng.normal(0.60, 0.08, DEPTH + 1)
        if outside:
            scores = np.sort(others)[::-1]
            found.append(Sample(tuple(scores.tolist()), None, False, f"out{i}"))
            continue
        others[0] = rng.normal(0.78, 0.07)  # index 0: the right implant
        order = np.argsort(-others)
        rank = int(np.flatnonzero(order == 0)[0]) + 1
        found.append(Sample(tuple(others[order].tolist()), rank, True, f"in{i}"))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_coverage_is_recovered_on_a_known_distribution(target: float) -> None:
    rng = np.random.default_rng(int(target * 100))
    fitted = calibrate.fit(
        _samples(1500, rng) + _samples(375, rng, outside=True),
        model_id="m",
        target=target,
        tta=False,
        source="labels",
        counts={},
    )
    test = _samples(4000, rng) + _samples(1000, rng, outside=True)
    measured = calibrate.measure(fitted, test)
    assert measured["coverage"] == pytest.approx(target, abs=0.02)
    assert measured["ece"] <= 0.05 < measured["ece_raw_score"]
    assert measured["false_alarm"] == pytest.approx(0.05, abs=0.015)
    assert measured["ooc_auroc"] > 0.8
    assert 1 <= measured["mean_set_size"] < DEPTH
    held = fitted.metrics["held_out_half"]
    assert held["coverage"] == pytest.approx(target, abs=0.05)


def _offset_samples(n: int, rng: np.random.Generator, *, outside: bool) -> list[Sample]:
    """Queries whose whole ranked list moves with the X-ray (some score high against
    every implant): each query's implants score around its own level, and the right
    implant stands 0.15 above that level. The top score alone barely tells an X-ray of
    an implant not in the catalogue; where it stands among the query's own scores does."""
    found = []
    for i in range(n):
        level = rng.uniform(0.35, 0.75)
        others = rng.normal(level, 0.02, DEPTH + 1)
        if not outside:
            others[0] = level + 0.15 + rng.normal(0, 0.02)  # index 0: the right implant
        order = np.argsort(-others)
        rank = None if outside else int(np.flatnonzero(order == 0)[0]) + 1
        found.append(Sample(tuple(others[order].tolist()), rank, not outside, f"q{i}{outside}"))
    return found


def test_open_set_statistic_separates_a_known_unknown_distribution() -> None:
    """With real X-rays of implants not in the catalogue among the calibration queries
    (confirmed "not in the catalogue"), the fitted statistic separates new ones far
    better than the top score, and its conformal p-value keeps the false-alarm rate
    on new X-rays of catalogued implants. Without real ones the top score stays."""
    rng = np.random.default_rng(21)
    known = _offset_samples(600, rng, outside=False)
    alone = calibrate.fit(known, model_id="m", tta=False, source="labels", counts={})
    assert alone.params["ooc"]["chosen"] == "top score"  # simulated ones never decide
    fitted = calibrate.fit(
        known + _offset_samples(100, rng, outside=True),
        model_id="m",
        tta=False,
        source="confirmed",
        counts={},
    )
    ooc = fitted.params["ooc"]
    assert ooc["statistic"] == calibrate.OOC_STATISTIC and ooc["chosen"] == "logistic"
    assert 30 <= ooc["fitted_on"]["real_out_of_catalogue"] <= 70  # the regression's half
    assert ooc["cross_validated_auroc"]["logistic"] > ooc["cross_validated_auroc"]["top score"]
    # the other half, which the regression never saw, is the p-values' reference
    assert ooc["reference_queries"] + ooc["fitted_on"]["in_catalogue"] == 600
    assert "reference" not in fitted.to_dict()["params"]["ooc"]
    test = _offset_samples(3000, rng, outside=False) + _offset_samples(1000, rng, outside=True)
    measured = calibrate.measure(fitted, test)
    assert measured["ooc_auroc_top_score"] < 0.75
    assert measured["ooc_auroc"] > 0.97
    assert calibrate.measure(alone, test)["ooc_auroc"] == measured["ooc_auroc_top_score"]
    assert measured["false_alarm"] == pytest.approx(0.05, abs=0.02)
    assert measured["detected"] > 0.8
    answer = calibrate.apply(fitted, [(f"k{j}", x) for j, x in enumerate(test[-1].scores)])
    assert answer.out_of_catalogue and answer.verdict == "not_in_catalogue"


def test_a_calibration_stored_before_the_fitted_statistic_still_applies() -> None:
    """Old rows hold the in-catalogue top scores (ooc_tops) and no "ooc": their flag
    stays the top score's p-value, as when they were fitted."""
    rng = np.random.default_rng(3)
    fitted = calibrate.fit(_samples(200, rng), model_id="m", tta=False, source="labels", counts={})
    params = {k: v for k, v in fitted.params.items() if k != "ooc"}
    params["ooc_tops"] = sorted(s.scores[0] for s in _samples(99, rng))
    old = calibrate.Calibration("m", 0.9, 0.05, False, "labels", {}, "", params)
    low, high = (0.1,) + (0.05,) * DEPTH, (1.5,) + (0.5,) * DEPTH
    assert old.ooc_statistic(high) == 1.5
    assert old.ooc_p(low) == pytest.approx(1 / 100) and old.ooc_p(high) == 1.0
    assert calibrate.apply(old, [(f"k{j}", x) for j, x in enumerate(low)]).out_of_catalogue
    assert "ooc_tops" not in old.to_dict()["params"]


def test_ece_floor_is_the_estimators_own_noise() -> None:
    """A perfectly calibrated probability still shows an ECE at a finite count: the
    floor says how much, and shrinks with more queries."""
    p = np.random.default_rng(0).uniform(0, 1, 500)
    floor = measures.ece_floor(p)
    assert 0.02 < floor < 0.09
    assert measures.ece_floor(np.tile(p, 20)) < floor / 3


def test_conformal_quantile_is_the_finite_sample_one() -> None:
    scores = list(range(1, 10))  # n = 9: ceil(10 * 0.9) = 9th smallest
    assert calibrate.conformal_quantile(scores, 0.9) == 9
    assert calibrate.conformal_quantile(scores, 0.95) == float("inf")  # 10th of 9
    assert calibrate.conformal_quantile(scores, 0.5) == 5


def test_metric_helpers() -> None:
    assert measures.ece([0.9] * 10, [1] * 9 + [0]) == pytest.approx(0.0)
    assert measures.ece([1.0, 0.0], [0, 1]) == pytest.approx(1.0)
    assert measures.brier([1.0, 0.0], [1, 0]) == 0.0
    assert measures.auroc([3, 4], [1, 2]) == 1.0 and measures.auroc([1], [1]) == 0.5
    assert measures.fpr_at_tpr([3, 4], [1, 2]) == 0.0


def test_too_few_queries_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(calibrate.NoCalibrationData, match="at least 20"):
        calibrate.fit(_samples(5, rng), model_id="m", tta=False, source="labels", counts={})


# --- the command, on a catalogue embedded with a (tiny) model from a file -----------


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights in a file: a model raiox cannot tell from a trained one
    (random weights are never calibrated)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from raiox_cli import embedding

    embedding.register_bundled_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = open_clip.create_model("raiox-tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def weighted(raiox_env, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    monkeypatch.setenv("RAIOX_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("RAIOX_TTA", "0")  # one orientation: a third of the embedding time
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    return config.resolve()


def _ingest(root: Path, systems: int = 5) -> synth.SynthInfo:
    info = synth.make_catalogue(root, systems=systems, views=3, queries=1, size=(64, 80))
    result = runner.invoke(app, ["ingest", str(info.catalogue)])
    assert result.exit_code == 0, result.output
    return info


@pytest.mark.slow
def test_calibrate_from_the_catalogue_then_every_answer_carries_it(weighted, tmp_path: Path):
    info = _ingest(tmp_path / "s")
    result = runner.invoke(app, ["calibrate", "--queries", "60", "--json"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["source"] == "catalogue" and "no --labels" in fit["why"]
    assert fit["counts"]["catalogue_in"] == 60 and fit["counts"]["catalogue_out"] == 60
    assert fit["counts"]["kept_apart"].startswith("unknown: no model card")
    assert len(fit["data_sha256"]) == 64 and fit["target"] == 0.9
    assert 0 <= fit["metrics"]["held_out_half"]["coverage"] <= 1

    shown = runner.invoke(app, ["calibrate", "--show"])
    assert shown.exit_code == 0, shown.output
    assert "in use" in shown.stdout and "coverage" in shown.stdout and "catalogue" in shown.stdout

    query = info.query_files[0]
    answer = runner.invoke(app, ["search", str(query), "--json"])
    assert answer.exit_code == 0, answer.output
    trust = json.loads(answer.stdout)["trust"]
    assert trust["calibrated"] is True and trust["reason"] is None
    assert 0 <= trust["probability"] <= 1 and trust["set_coverage"] == 0.9
    assert set(trust["prediction_set"]) <= {i.key for i in info.implants}
    assert isinstance(trust["out_of_catalogue"], bool)
    assert 0 < trust["out_of_catalogue_score"] < 1
    assert trust["verdict"] in calibrate.VERDICTS

    table = runner.invoke(app, ["search", str(query)])
    assert table.exit_code == 0, table.output
    assert "likely right" in table.stdout and "confidence" in table.stdout

    # The contact sheet colours the prediction set as the calibrated verdict says
    # (green strong, amber possible) and nothing else, whatever --min-score says.
    drawn = tmp_path / "sheet.png"
    sheet_run = runner.invoke(
        app, ["search", str(query), "--json", "--sheet", str(drawn), "--min-score", "0"]
    )
    assert sheet_run.exit_code == 0, sheet_run.output
    answered = json.loads(sheet_run.stdout)
    hues = _caption_hues(drawn, len(answered["matches"]))
    for match, hue in zip(answered["matches"], hues, strict=True):
        in_set = match["key"] in answered["trust"]["prediction_set"]
        expected = {"strong": "green", "possible": "amber"}.get(answered["trust"]["verdict"])
        assert hue == (expected if in_set else None), (match["key"], answered["trust"])

    batch = runner.invoke(app, ["search", str(query), str(info.query_files[1])])
    assert batch.exit_code == 0, batch.output
    lines = [json.loads(line) for line in batch.stdout.splitlines()]
    assert len(lines) == 2 and all(line["trust"]["calibrated"] for line in lines)

    saved = runner.invoke(app, ["search", str(query), "--save", "--json"])
    analysis_id = json.loads(saved.stdout)["analysis_id"]
    with db.connect(weighted) as conn:
        stored = queries.get_analysis(conn, analysis_id)["trust"]
    assert stored["probability"] == trust["probability"] and len(stored["ranked"]) == 5


@pytest.mark.slow
def test_day_one_calibration_of_a_model_trained_on_other_designs_says_so(
    weighted, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """adapt --extra-labels: the catalogue's simulated X-rays set the open-set threshold
    too high on such a model (bench/README.md), so calibrating from them warns."""
    info = _ingest(tmp_path / "s")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_weights, run / "model.safetensors")  # the same model id
    card = {
        "created_at": "2026-12-01T00:00:00Z",
        "data": {"held_out_implants": [i.key for i in info.implants[:3]], "extra_implants": 300},
    }
    (run / "model-card.json").write_text(json.dumps(card))
    monkeypatch.setenv("RAIOX_WEIGHTS", str(run / "model.safetensors"))
    result = runner.invoke(app, ["calibrate", "--queries", "40", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == "catalogue"
    said = " ".join(result.stderr.split())
    assert "also trained on 300 designs outside the catalogue" in said
    assert "calibrate on labelled X-rays" in said
    card["data"]["extra_implants"] = 0
    (run / "model-card.json").write_text(json.dumps(card))
    result = runner.invoke(app, ["calibrate", "--queries", "40", "--json"])
    assert result.exit_code == 0 and "outside the catalogue" not in result.stderr


@pytest.mark.slow
def test_random_weights_are_never_calibrated(raiox_env, tmp_path: Path) -> None:
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    info = _ingest(tmp_path / "s", systems=3)
    answer = runner.invoke(app, ["search", str(info.query_files[0]), "--json"])
    trust = json.loads(answer.stdout)["trust"]
    assert trust["calibrated"] is False and "random model weights" in trust["reason"]
    assert trust["probability"] is None and trust["verdict"] in ("strong", "possible", "none")
    table = runner.invoke(app, ["search", str(info.query_files[0])])
    assert "uncalibrated" in table.stdout
    # An uncalibrated sheet colours no score, even every one above --min-score.
    drawn = tmp_path / "sheet.png"
    sheet_run = runner.invoke(
        app, ["search", str(info.query_files[0]), "--sheet", str(drawn), "--min-score", "0"]
    )
    assert sheet_run.exit_code == 0, sheet_run.output
    assert set(_caption_hues(drawn, 3)) == {None}


def _caption_hues(path: Path, matches: int) -> list[str | None]:
    """The colour of each match's caption on a contact sheet: green, amber or none."""
    from PIL import Image

    from raiox_cli.search import sheet

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    found: list[str | None] = []
    for column in range(1, matches + 1):
        left, top, right, bottom = sheet.caption_box(column)
        r, g, b = (pixels[top:bottom, left:right, i] for i in range(3))
        if ((g > r + 40) & (g > b + 40)).any():
            found.append("green")
        elif ((r > b + 80) & (g > b + 40)).any():
            found.append("amber")
        else:
            found.append(None)
    return found


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(weighted, tmp_path: Path) -> None:
    for target in ("1.5", "0", "-0.1"):
        result = runner.invoke(app, ["calibrate", "--target", target])
        assert result.exit_code == 2, result.output
        assert "--target must be between 0 and 1" in result.stderr

    result = runner.invoke(app, ["calibrate"])
    assert result.exit_code == 6 and "catalogue is empty" in result.stderr

    one = synth.make_catalogue(tmp_path / "one", systems=1, views=3, queries=0, size=(64, 80))
    assert runner.invoke(app, ["ingest", str(one.catalogue)]).exit_code == 0
    result = runner.invoke(app, ["calibrate"])
    assert result.exit_code == 1 and "1 implant" in result.stderr

    _ingest(tmp_path / "s", systems=3)
    result = runner.invoke(app, ["calibrate", "--source", "confirmed"])
    assert result.exit_code == 1 and "no confirmed analysis" in result.stderr

    labels = tmp_path / "labels" / "Nobody Dental" / "Ghost Implant"
    labels.mkdir(parents=True)
    shutil.copy(one.catalogue_files[0], labels / "x.png")
    result = runner.invoke(app, ["calibrate", "--labels", str(tmp_path / "labels")])
    assert result.exit_code == 2, result.output
    assert "name no implant of the catalogue" in result.stderr and "Ghost Implant" in result.stderr

    result = runner.invoke(app, ["calibrate", "--source", "labels"])
    assert result.exit_code == 2 and "--labels DIR" in result.stderr
    result = runner.invoke(app, ["calibrate", "--source", "sometimes"])
    assert result.exit_code == 2 and "--source must be one of" in result.stderr


@pytest.mark.slow
def test_a_model_switch_makes_it_stale_and_reindex_refits(
    weighted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = _ingest(tmp_path / "s", systems=4)
    assert runner.invoke(app, ["calibrate", "--queries", "40"]).exit_code == 0
    with db.connect(weighted) as conn:
        first = calibrate.load(conn, queries.active_model(conn).model_id)
    assert first is not None and not first.stale

    # Another model file: the switch marks the calibration stale, reindex refits for it.
    import safetensors.torch

    state = safetensors.torch.load_file(str(weighted.weights))
    name = next(iter(state))
    state[name] = state[name] + 0.01
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(state, str(other))
    monkeypatch.setenv("RAIOX_WEIGHTS", str(other))
    result = runner.invoke(app, ["reindex", "--weights", str(other), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["switched"] is True, result.stdout
    assert report["calibration"]["refitted"] is True
    assert report["calibration"]["reason"] == "missing after a model switch"
    assert report["calibration"]["source"] == "catalogue"
    assert "refitted from catalogue" in result.stderr
    with db.connect(weighted) as conn:
        old = queries.latest_calibration(conn, first.model_id)
        new = calibrate.load(conn, queries.active_model(conn).model_id)
    assert old["stale_at"] is not None and "switched" in old["stale_reason"]
    assert new is not None and not new.stale and new.model_id != first.model_id

    answer = runner.invoke(app, ["search", str(info.query_files[0]), "--json"])
    assert json.loads(answer.stdout)["trust"]["calibrated"] is True


@pytest.mark.slow
def test_a_stale_calibration_is_not_applied(weighted, tmp_path: Path) -> None:
    info = _ingest(tmp_path / "s", systems=3)
    assert runner.invoke(app, ["calibrate", "--queries", "30"]).exit_code == 0
    with db.connect(weighted) as conn:
        queries.mark_calibrations_stale(conn, "the catalogue switched from a to b")
        conn.commit()
    answer = runner.invoke(app, ["search", str(info.query_files[0]), "--json"])
    trust = json.loads(answer.stdout)["trust"]
    assert trust["calibrated"] is False and "stale" in trust["reason"]
    shown = runner.invoke(app, ["calibrate", "--show"])
    assert "STALE" in shown.stdout
    # the nightly reindex (no switch) refits a stale calibration in place
    result = runner.invoke(app, ["reindex", "--json"])
    assert json.loads(result.stdout)["calibration"]["reason"] == "stale"
    answer = runner.invoke(app, ["search", str(info.query_files[0]), "--json"])
    assert json.loads(answer.stdout)["trust"]["calibrated"] is True


@pytest.mark.slow
def test_eval_measures_the_calibration_and_plots_it(weighted, tmp_path: Path) -> None:
    info = _ingest(tmp_path / "s", systems=5)
    unknown = synth.make_catalogue(tmp_path / "u", systems=7, views=1, queries=2, size=(64, 80))
    assert runner.invoke(app, ["calibrate", "--queries", "40"]).exit_code == 0

    plot = tmp_path / "trust.png"
    result = runner.invoke(
        app,
        ["eval", str(info.queries_dir), "--unknown", str(unknown.queries_dir), "--plot", str(plot),
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    trust = json.loads(result.stdout)["trust"]
    assert trust["calibrated"] is True and trust["target"] == 0.9
    assert trust["in_catalogue"] == len(info.query_files)
    assert trust["out_of_catalogue"] == trust["unknown_queries"] == 14  # 7 systems x 2
    for key in ("ece", "brier", "coverage", "mean_set_size", "ooc_auroc", "ooc_fpr_at_95tpr"):
        assert trust[key] is not None and trust[key] >= 0
    assert len(trust["reliability"]) == measures.ECE_BINS
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = runner.invoke(app, ["eval", str(info.queries_dir)])
    assert "ECE" in table.stdout and "coverage" in table.stdout

    # Calibrated answers, confirmed: eval --confirmed reads what they said, per month.
    saved = []
    for query in info.query_files[:3]:
        answer = runner.invoke(app, ["search", str(query), "--save", "--json"])
        saved.append((query, json.loads(answer.stdout)["analysis_id"]))
    for query, analysis_id in saved[:2]:
        key = info.label_of(query)
        assert runner.invoke(app, ["confirm", str(analysis_id), key]).exit_code == 0
    assert runner.invoke(app, ["confirm", str(saved[2][1]), "--not-in-catalogue"]).exit_code == 0
    real = runner.invoke(app, ["eval", "--confirmed", "--json", "--plot", str(plot)])
    assert real.exit_code == 0, real.output
    answered = json.loads(real.stdout)["trust"]
    assert answered["all"]["in_catalogue"] == 2 and answered["all"]["not_in_catalogue"] == 1
    assert len(answered["by_month"]) == 1 and answered["all"]["coverage"] is not None
    table = runner.invoke(app, ["eval", "--confirmed"])
    assert "calibrated answers" in table.stdout


@pytest.mark.slow
def test_calibrate_from_labels_and_from_confirmations(weighted, tmp_path: Path) -> None:
    _ingest(tmp_path / "s", systems=5)
    queries_dir = synth.make_catalogue(
        tmp_path / "q", systems=5, views=1, queries=5, size=(64, 80)
    ).queries_dir  # same seed: the same 5 implants, 25 X-ray-like queries
    result = runner.invoke(app, ["calibrate", "--labels", str(queries_dir), "--json"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["source"] == "labels" and fit["counts"]["labelled_xrays"] == 25

    # 25 confirmed answers of this model (one not in the catalogue) calibrate too.
    for query in sorted(queries_dir.rglob("*.png")):
        answer = json.loads(runner.invoke(app, ["search", str(query), "--save", "--json"]).stdout)
        key = f"{query.parent.parent.name}/{query.parent.name}"
        assert runner.invoke(app, ["confirm", str(answer["analysis_id"]), key]).exit_code == 0
    result = runner.invoke(app, ["calibrate", "--source", "confirmed", "--json"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["source"] == "confirmed" and fit["counts"]["confirmed"] == 25
    assert fit["params"]["probability_of"] == "any X-ray"
