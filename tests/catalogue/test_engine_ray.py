"""--engine ray: the pipeline's stages on a local Ray instance (2 CPUs, started once
per session by the `ray_address` fixture) give the rows of the local engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.catalogue.ingest import ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.training import synth
from tests.helpers.catalogue import (
    assert_same_rows,
    catalogue_rows,
    store_synthetic_catalogue,
    upload_folder,
)
from tests.helpers.env import fresh_database

SMALL = (64, 80)


def _local_twin(settings: config.Settings, pg_server_url: str) -> config.Settings:
    """The same settings on a fresh database, for a clean run of the local engine."""
    twin = settings.replace(database_url=fresh_database(pg_server_url), engine="local")
    db.migrate(twin)
    return twin


def test_engine_ray_without_the_extra_says_how_to_install(
    migrated: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    info = synth.make_catalogue(tmp_path / "s", systems=1, views=1, queries=0, size=SMALL)
    result = CliRunner().invoke(app, ["ingest", str(info.catalogue), "--engine", "ray"])
    assert result.exit_code == 2, result.output
    assert "pip install 'raiox[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert catalogue_rows(migrated)["images"] == []  # refused before any work


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ingest_with_ray_from_s3_gives_the_rows_of_the_local_engine(
    migrated: config.Settings,
    pg_server_url: str,
    ray_address: str,
    s3_server: str,
    s3_bucket: str,
    tmp_path: Path,
):
    settings = config.resolve()  # with the bucket's RAIOX_S3_* settings
    info = synth.make_catalogue(tmp_path / "s", systems=3, views=2, queries=0, size=SMALL)
    # A broken file and the same content twice in one implant: failures and duplicates
    # must come out the same too.
    (info.implants[0].folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    shutil.copy(info.implants[1].views[0], info.implants[1].folder / "view_00_copy.png")
    upload_folder(info.catalogue, s3_server, s3_bucket, "cat")

    result = CliRunner().invoke(
        app, ["ingest", f"s3://{s3_bucket}/cat", "--engine", "ray", "--batch-size", "4", "--json"]
    )
    assert result.exit_code == 1, result.output  # the broken file
    on_ray = json.loads(result.stdout.strip().splitlines()[-1])
    local = _local_twin(settings, pg_server_url)
    here = ingest_catalogue(local, info.catalogue)
    counts = ("new", "duplicates", "embedded", "implants_new")
    assert [on_ray[c] for c in counts] == [getattr(here, c) for c in counts] == [6, 1, 6, 3]
    assert [f["path"] for f in on_ray["failed"]] == [f.path for f in here.failed]
    assert_same_rows(catalogue_rows(settings), catalogue_rows(local))


@pytest.mark.ray
@pytest.mark.timeout(900)  # a subprocess driver, and a rerun: slow when 2 cores are busy
def test_ray_driver_killed_mid_run_then_rerun_converges(
    migrated: config.Settings, pg_server_url: str, ray_address: str, tmp_path: Path
):
    info = synth.make_catalogue(tmp_path / "s", systems=4, views=4, queries=0, size=SMALL)
    total = len(info.catalogue_files)
    command = [sys.executable, "-m", "raiox_cli", "ingest", str(info.catalogue)]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.Popen(
        [*command, "--engine", "ray", "--batch-size", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killed_at = None
    deadline = time.monotonic() + 240
    with psycopg.connect(migrated.database_url, autocommit=True) as watch:
        while proc.poll() is None and time.monotonic() < deadline:
            count = watch.execute("SELECT count(*) FROM image_embeddings").fetchone()[0]
            if count >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = count
                break
            time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert killed_at is not None and killed_at < total
    partial = catalogue_rows(migrated)
    assert len(partial["images"]) == len(partial["vectors"]) < total

    resumed = ingest_catalogue(migrated.replace(engine="ray"), info.catalogue)
    assert resumed.ok and resumed.unchanged + resumed.new == total
    local = _local_twin(migrated, pg_server_url)
    ingest_catalogue(local, info.catalogue)
    assert_same_rows(catalogue_rows(migrated), catalogue_rows(local))


@pytest.mark.ray
def test_batch_search_with_ray_answers_as_the_local_engine(
    conn: psycopg.Connection, tiny_embedder, ray_address: str, tmp_path: Path
):
    info = synth.make_catalogue(tmp_path / "s", systems=4, views=2, queries=2, size=SMALL)
    store_synthetic_catalogue(conn, tiny_embedder, info)
    folder = tmp_path / "xrays"
    shutil.copytree(info.queries_dir, folder)
    (folder / "notes.png").write_text("not an image")
    runner = CliRunner()
    common = ["search", str(folder), "-k", "3", "--batch-size", "6"]
    local = runner.invoke(app, [*common, "--out", str(tmp_path / "local.jsonl")])
    on_ray = runner.invoke(
        app, [*common, "--engine", "ray", "--save", "--out", str(tmp_path / "ray.jsonl")]
    )
    assert local.exit_code == on_ray.exit_code == 1, on_ray.output  # notes.png
    assert f"{folder / 'notes.png'}: " in on_ray.stderr

    def answers(name: str) -> list[dict]:
        lines = (tmp_path / name).read_text().splitlines()
        return [json.loads(line) for line in lines]

    want, got = answers("local.jsonl"), answers("ray.jsonl")
    assert len(got) == len(want) == 8 and all(a["analysis_id"] for a in got)
    for a, b in zip(got, want, strict=True):
        assert (a["path"], a["sha256"], a["orientations"]) == (
            b["path"],
            b["sha256"],
            b["orientations"],
        )
        assert [m["key"] for m in a["matches"]] == [m["key"] for m in b["matches"]]
        scores = [m["score"] for m in a["matches"]], [m["score"] for m in b["matches"]]
        assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    saved = conn.execute("SELECT count(*) FROM analyses WHERE source = 'cli'").fetchone()[0]
    assert saved == 8
