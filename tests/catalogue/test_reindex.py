"""reindex: nightly sync of recorded roots, the writer lock, and model switches."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raiox_cli import config, db, embedding, images
from raiox_cli.catalogue import reindex as core
from raiox_cli.catalogue.ingest import ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.db import queries
from raiox_cli.errors import ModelMismatch
from raiox_cli.search import query as search_core
from raiox_cli.training import synth

SMALL = (64, 80)


def _catalogue(tmp_path: Path, systems: int = 3, views: int = 2) -> synth.SynthInfo:
    return synth.make_catalogue(tmp_path / "s", systems=systems, views=views, queries=1, size=SMALL)


def _search(settings: config.Settings, spec: embedding.ModelSpec, query: Path):
    with db.connect(settings) as conn:
        return search_core.search_image(
            conn, embedding.load_embedder(spec), images.load_image(query), k=2
        )


def test_reindex_syncs_recorded_roots_quietly(migrated: config.Settings, tmp_path: Path):
    info = _catalogue(tmp_path)
    ingest_catalogue(migrated, info.catalogue)
    info.implants[0].views[0].unlink()
    result = CliRunner().invoke(app, ["reindex"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # cron: silent on success when not on a terminal
    result = CliRunner().invoke(app, ["reindex", "--json"])
    summary = json.loads(result.stdout)
    assert summary["roots"][0]["unchanged"] == 5 and summary["roots"][0]["removed"] == 0
    assert summary["model_loaded"] is False and summary["switched"] is False
    with db.connect(migrated) as conn:
        assert queries.count_images(conn) == 5


def test_missing_root_is_reported_not_pruned(migrated: config.Settings, tmp_path: Path):
    info = _catalogue(tmp_path)
    ingest_catalogue(migrated, info.catalogue)
    info.catalogue.rename(tmp_path / "elsewhere")
    result = CliRunner().invoke(app, ["reindex"])
    assert result.exit_code == 1
    assert f"{info.catalogue}: catalogue folder is missing" in result.stderr
    with db.connect(migrated) as conn:
        assert queries.count_images(conn) == 6


def test_second_writer_exits_75_naming_the_holder_or_waits(
    migrated: config.Settings, tmp_path: Path
):
    info = _catalogue(tmp_path, systems=1, views=1)
    ingest_catalogue(migrated, info.catalogue)
    holder = db.connect(migrated, autocommit=True)
    queries.set_application_name(holder, "raiox ingest (pid 4242)")
    assert queries.try_writer_lock(holder)
    try:
        result = CliRunner().invoke(app, ["reindex"])
        assert result.exit_code == 75
        assert "raiox ingest (pid 4242) holds the writer lock" in result.stderr
        assert "--wait" in result.stderr
        result = CliRunner().invoke(app, ["ingest", str(info.catalogue)])
        assert result.exit_code == 75
        threading.Timer(1.0, holder.close).start()
        start = time.monotonic()
        result = CliRunner().invoke(app, ["reindex", "--wait", "--json"])
        assert result.exit_code == 0, result.output
        assert time.monotonic() - start >= 0.9
    finally:
        holder.close()


@pytest.mark.slow
def test_model_switch_to_another_dimension(migrated: config.Settings, tmp_path: Path):
    info = _catalogue(tmp_path, systems=4, views=3)
    old_spec = embedding.ModelSpec.from_settings(migrated)
    new_spec = embedding.ModelSpec("raiox-tiny48", "none", None, "cpu")
    ingest_catalogue(migrated, info.catalogue)
    query = info.query_files[0]
    before = _search(migrated, old_spec, query)
    assert before.model_id == "raiox-tiny:none" and before.matches

    answers = []

    def search_meanwhile(phase: str, done: int, total: int) -> None:
        # Mid-switch, with some new-model rows committed: search still answers
        # from the old model, with the whole catalogue.
        if 0 < done < total:
            during = _search(migrated, old_spec, query)
            answers.append((during.model_id, [m.key for m in during.matches]))

    settings = migrated.replace(model="raiox-tiny48", batch_size=2)
    report = core.reindex(settings, switch=True, progress=search_meanwhile)
    assert report.ok and report.switched, report.to_dict()
    assert answers and all(
        a == ("raiox-tiny:none", [m.key for m in before.matches]) for a in answers
    )
    assert (report.previous_model_id, report.model_id) == ("raiox-tiny:none", "raiox-tiny48:none")
    assert report.removed_models == ["raiox-tiny:none"] and report.removed_embeddings == 12
    with db.connect(migrated) as conn:
        active = queries.active_model(conn)
        assert (active.model_id, active.dim) == ("raiox-tiny48:none", 48)
        assert queries.count_embeddings(conn, "raiox-tiny48:none") == 12
        assert queries.count_embeddings(conn, "raiox-tiny:none") == 0
        assert queries.get_model(conn, "raiox-tiny:none") is None
        assert queries.model_index_valid(conn, active)
        old_index = queries.index_name_for("raiox-tiny:none")
        assert conn.execute("SELECT to_regclass(%s)", (old_index,)).fetchone()[0] is None
    after = _search(migrated, new_spec, query)
    assert after.model_id == "raiox-tiny48:none" and after.matches
    with pytest.raises(ModelMismatch):
        _search(migrated, old_spec, query)

    # The nightly job now keeps the new model, whatever the environment says.
    again = core.reindex(migrated)
    assert (again.model_id, again.switched, again.model_loaded) == (
        "raiox-tiny48:none",
        False,
        False,
    )


def test_interrupted_switch_resumes_and_search_stays_on_old(
    migrated: config.Settings, tmp_path: Path
):
    info = _catalogue(tmp_path, systems=2, views=2)
    ingest_catalogue(migrated, info.catalogue)
    settings = migrated.replace(model="raiox-tiny48", batch_size=1)

    class Stop(Exception):
        pass

    def stop_midway(phase: str, done: int, total: int) -> None:
        if done >= 2:
            raise Stop

    with pytest.raises(Stop):
        core.reindex(settings, switch=True, progress=stop_midway)
    with db.connect(migrated) as conn:
        assert queries.active_model(conn).model_id == "raiox-tiny:none"
        partial = queries.count_embeddings(conn, "raiox-tiny48:none")
        assert 0 < partial < 4
    report = core.reindex(settings, switch=True)
    assert report.switched and report.ok
    with db.connect(migrated) as conn:
        assert queries.count_embeddings(conn, "raiox-tiny48:none") == 4


def test_cron_environment_does_not_switch_by_accident(migrated: config.Settings, tmp_path: Path):
    info = _catalogue(tmp_path, systems=1, views=1)
    ingest_catalogue(migrated, info.catalogue)
    report = core.reindex(migrated.replace(model="raiox-tiny48"))
    assert (report.model_id, report.switched) == ("raiox-tiny:none", False)
