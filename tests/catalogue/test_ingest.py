"""Catalogue ingest: incremental, crash-safe, prune, CSV metadata and errors, S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.catalogue.ingest import IngestOptions, ingest_catalogue
from raiox_cli.catalogue.scan import implant_key, scan
from raiox_cli.cli import app
from raiox_cli.db import queries
from raiox_cli.training import synth

SMALL = (64, 80)


def _rows(settings: config.Settings) -> dict[str, Any]:
    """What a run leaves behind, independent of ids and timestamps."""
    with db.connect(settings) as conn:
        images = conn.execute(
            """SELECT i.key, i.name, i.manufacturer, i.system, i.diameter_mm, im.sha256,
                      im.source_path, im.storage_key, im.width, im.height
               FROM implant_images im JOIN implants i ON i.id = im.implant_id"""
        ).fetchall()
        vectors = conn.execute(
            """SELECT i.key, im.sha256, e.model_id, e.embedding
               FROM image_embeddings e JOIN implant_images im ON im.id = e.image_id
               JOIN implants i ON i.id = im.implant_id"""
        ).fetchall()
        implants = conn.execute("SELECT key FROM implants").fetchall()
        active = queries.active_model(conn)
    return {
        "images": sorted(images),
        "implants": sorted(implants),
        "vectors": {(k, s, m): v.to_numpy() for k, s, m, v in vectors},
        "active": active.model_id if active else None,
    }


def _replace_image(path: Path, seed: int) -> None:
    design = synth.design_systems(1, seed=seed)[0]
    img = synth.render_view(design, seed=seed, query=True, size=SMALL)
    path.write_bytes(synth.png_bytes(img))


def test_incremental_nothing_changed_then_one_file(migrated: config.Settings, tmp_path: Path):
    info = synth.make_catalogue(tmp_path / "s", systems=3, views=2, queries=0, size=SMALL)
    first = ingest_catalogue(migrated, info.catalogue)
    assert (first.new, first.embedded, first.implants_new, first.failed) == (6, 6, 3, [])
    assert first.model_loaded and first.index_valid
    rows = _rows(migrated)
    assert rows["active"] == "raiox-tiny:none"
    assert {r[0] for r in rows["images"]} == {i.key for i in info.implants}
    assert all(r[7] and r[7].startswith("sha256/") for r in rows["images"])  # stored

    again = ingest_catalogue(migrated, info.catalogue)
    assert (again.unchanged, again.embedded, again.new, again.updated) == (6, 0, 0, 0)
    assert not again.model_loaded

    changed = info.implants[0].views[0]
    _replace_image(changed, seed=99)
    touched = info.implants[1].views[1]
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime
    third = ingest_catalogue(migrated, info.catalogue)
    assert (third.updated, third.embedded, third.unchanged, third.new) == (1, 1, 5, 0)
    after = _rows(migrated)
    assert len(after["images"]) == 6 and len(after["vectors"]) == 6

    fourth = ingest_catalogue(migrated, info.catalogue)
    assert (fourth.embedded, fourth.unchanged, fourth.model_loaded) == (0, 6, False)


def test_the_writer_lock_is_free_when_ingest_returns(migrated: config.Settings, tmp_path: Path):
    """Released by the session itself, not left to the server's backend exiting after
    close(): the next writer, started at once, must find it free (it once found the
    previous ingest of the same process still holding it)."""
    info = synth.make_catalogue(tmp_path / "s", systems=1, views=1, queries=0, size=SMALL)
    for _ in range(3):
        ingest_catalogue(migrated, info.catalogue)
        with db.connect(migrated, autocommit=True) as conn:
            assert queries.writer_lock_holder(conn) is None
            assert queries.try_writer_lock(conn)
            queries.release_writer_lock(conn)


def test_prune_and_dry_run(migrated: config.Settings, tmp_path: Path):
    info = synth.make_catalogue(tmp_path / "s", systems=3, views=2, queries=0, size=SMALL)
    ingest_catalogue(migrated, info.catalogue)
    info.implants[0].views[0].unlink()
    for path in info.implants[2].views:
        path.unlink()
    kept = ingest_catalogue(migrated, info.catalogue)
    assert (kept.removed, kept.unchanged) == (0, 3)
    assert len(_rows(migrated)["images"]) == 6

    preview = ingest_catalogue(migrated, info.catalogue, IngestOptions(prune=True, dry_run=True))
    assert (preview.dry_run, preview.removed) == (True, 3)
    assert len(_rows(migrated)["images"]) == 6

    pruned = ingest_catalogue(migrated, info.catalogue, IngestOptions(prune=True))
    assert (pruned.removed, pruned.implants_removed, pruned.embedded) == (3, 1, 0)
    rows = _rows(migrated)
    assert len(rows["images"]) == 3 and len(rows["vectors"]) == 3
    assert info.implants[2].key not in {k for (k,) in rows["implants"]}


def test_prune_touches_only_its_own_root(migrated: config.Settings, tmp_path: Path):
    a = synth.make_catalogue(tmp_path / "a", systems=2, views=1, queries=0, size=SMALL)
    b = synth.make_catalogue(tmp_path / "b", systems=2, views=1, queries=0, size=SMALL, seed=5)
    ingest_catalogue(migrated, a.catalogue)
    ingest_catalogue(migrated, b.catalogue)
    for path in a.catalogue_files:
        path.unlink()
    report = ingest_catalogue(migrated, a.catalogue, IngestOptions(prune=True))
    assert report.removed == 2
    assert {r[0] for r in _rows(migrated)["images"]} == {i.key for i in b.implants}


CSV_TEXT = """\
name,manufacturer,system,diameter_mm,length_mm,connection,notes,path,lot
Alpha 4x10,Acme,Alpha,4.0,10,conical,first,Acme/alpha,L1
Beta,Acme,Beta,abc,-3,,,Acme/beta,
Gamma,Acme,,,,,,Acme/gamma,
Alpha again,Acme,,,,,,Acme/alpha,
Special,Acme,Spec,3.5,8,,one image moved,Acme/beta/b2.png,
"""


def _csv_catalogue(root: Path) -> None:
    for folder, names in {"alpha": ["a1.png"], "beta": ["b1.png", "b2.png"]}.items():
        (root / "Acme" / folder).mkdir(parents=True)
        for n, name in enumerate(names):
            _replace_image(root / "Acme" / folder / name, seed=len(folder) * 10 + n)
    (root / "catalogue.csv").write_text(CSV_TEXT, encoding="utf-8")
    (root / "README.txt").write_text("not an image")


def test_csv_metadata_wins_and_errors_are_one_line_each(migrated: config.Settings, tmp_path: Path):
    root = tmp_path / "cat"
    _csv_catalogue(root)
    problems = [str(p) for p in scan(root).problems]
    assert problems == [
        "catalogue.csv:3: diameter_mm 'abc' is not a positive number; left empty",
        "catalogue.csv:3: length_mm '-3' is not a positive number; left empty",
        "catalogue.csv:5: duplicate entry for 'Acme/alpha' (first on row 2); this row is ignored",
        f"catalogue.csv:4: path 'Acme/gamma' matches no image in {root}",
    ]
    report = ingest_catalogue(migrated, root)
    assert report.new == 3 and len(report.failed) == 4
    with db.connect(migrated) as conn:
        implants = {
            r["key"]: r
            for r in queries.implants_by_key(
                conn,
                [
                    implant_key("Acme", "Alpha", "Alpha 4x10"),
                    implant_key("Acme", "Beta", "Beta"),
                    implant_key("Acme", "Spec", "Special"),
                ],
            ).values()
        }
    assert len(implants) == 3
    alpha = implants[implant_key("Acme", "Alpha", "Alpha 4x10")]
    assert (alpha["diameter_mm"], alpha["length_mm"], alpha["connection"]) == (4.0, 10.0, "conical")
    assert alpha["extra"] == {"lot": "L1"}  # unknown columns are kept as extra metadata
    beta = implants[implant_key("Acme", "Beta", "Beta")]
    assert beta["diameter_mm"] is None and beta["length_mm"] is None


def test_cli_json_exit_codes_and_csv_errors(migrated: config.Settings, tmp_path: Path):
    root = tmp_path / "cat"
    _csv_catalogue(root)
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(root), "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["new"] == 3 and len(summary["failed"]) == 4
    assert "catalogue.csv:3: diameter_mm 'abc'" in result.stderr
    (root / "catalogue.csv").unlink()
    result = runner.invoke(app, ["ingest", str(root), "--prune"])
    # Without the CSV the folder names decide: new implant keys, old images pruned.
    assert result.exit_code == 0, result.output
    assert "removed" in result.stdout
    result = runner.invoke(app, ["ingest", str(tmp_path / "missing")])
    assert result.exit_code == 2


def test_corrupt_file_is_reported_and_the_rest_goes_in(migrated: config.Settings, tmp_path: Path):
    info = synth.make_catalogue(tmp_path / "s", systems=2, views=2, queries=0, size=SMALL)
    bad = info.implants[0].folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    report = ingest_catalogue(migrated, info.catalogue)
    assert report.new == 4
    assert [f.path for f in report.failed] == [str(bad.relative_to(info.catalogue))]


def test_s3_storage_and_per_file_storage_failures(
    migrated: config.Settings, s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch
):
    info = synth.make_catalogue(tmp_path / "s", systems=2, views=2, queries=0, size=SMALL)
    monkeypatch.setenv("RAIOX_S3_BUCKET", "raiox-not-there")
    settings = config.resolve()
    failed = ingest_catalogue(settings, info.catalogue)
    assert len(failed.failed) == 4 and failed.embedded == 0
    assert all("s3://raiox-not-there/" in f.reason for f in failed.failed)
    assert _rows(settings)["images"] == []

    monkeypatch.setenv("RAIOX_S3_BUCKET", s3_bucket)
    settings = config.resolve()
    report = ingest_catalogue(settings, info.catalogue)
    assert (report.new, report.failed) == (4, [])
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    keys = {r[7] for r in _rows(settings)["images"]}
    assert {o["Key"] for o in listed} == keys
    acl = client.get_object_acl(Bucket=s3_bucket, Key=next(iter(keys)))
    assert "AllUsers" not in json.dumps(acl["Grants"])


def _fresh_database(pg_server_url: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, query = pg_server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


@pytest.mark.slow
def test_kill_9_then_rerun_equals_a_clean_run(
    migrated: config.Settings, pg_server_url: str, tmp_path: Path
):
    info = synth.make_catalogue(tmp_path / "s", systems=10, views=4, queries=0, size=(96, 120))
    total = len(info.catalogue_files)
    command = [sys.executable, "-m", "raiox_cli", "ingest", str(info.catalogue)]
    slow = [*command, "--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen(slow, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.monotonic() + 120
    with psycopg.connect(migrated.database_url, autocommit=True) as watch:
        while proc.poll() is None and time.monotonic() < deadline:
            count = watch.execute("SELECT count(*) FROM image_embeddings").fetchone()[0]
            if count >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_at = count
                break
            time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert killed_at is not None and killed_at < total
    partial = _rows(migrated)
    assert len(partial["images"]) == len(partial["vectors"])  # no image without its embedding

    subprocess.run(command, check=True, capture_output=True, timeout=180)
    resumed = _rows(migrated)

    clean_settings = migrated.replace(
        database_url=_fresh_database(pg_server_url), home=tmp_path / "clean"
    )
    db.migrate(clean_settings)
    ingest_catalogue(clean_settings, info.catalogue)
    clean = _rows(clean_settings)
    assert resumed["images"] == clean["images"]
    assert resumed["implants"] == clean["implants"]
    assert resumed["vectors"].keys() == clean["vectors"].keys()
    assert len(resumed["vectors"]) == total
    for key, vector in clean["vectors"].items():
        np.testing.assert_allclose(resumed["vectors"][key], vector, atol=1e-5)


def test_another_model_is_refused(migrated: config.Settings, tmp_path: Path):
    from raiox_cli.errors import ModelMismatch

    info = synth.make_catalogue(tmp_path / "s", systems=1, views=1, queries=0, size=SMALL)
    ingest_catalogue(migrated, info.catalogue)
    with pytest.raises(ModelMismatch, match="raiox reindex --model raiox-tiny48"):
        ingest_catalogue(migrated.replace(model="raiox-tiny48"), info.catalogue)


def test_renamed_file_is_moved_not_embedded_nor_pruned(migrated: config.Settings, tmp_path: Path):
    info = synth.make_catalogue(tmp_path / "s", systems=2, views=2, queries=0, size=SMALL)
    ingest_catalogue(migrated, info.catalogue)
    before = _rows(migrated)
    old = info.implants[0].views[0]
    new = old.parent / "sub" / "renamed.png"
    new.parent.mkdir()
    old.rename(new)
    report = ingest_catalogue(migrated, info.catalogue, IngestOptions(prune=True))
    assert (report.embedded, report.removed, report.unchanged, report.model_loaded) == (
        0,
        0,
        4,
        False,
    )
    after = _rows(migrated)
    moved = str(new.relative_to(info.catalogue))
    assert next(r for r in after["images"] if r[6] == moved)[8:] == (SMALL[0], SMALL[1])
    assert after["vectors"].keys() == before["vectors"].keys()


def test_moved_catalogue_adopts_its_rows(migrated: config.Settings, tmp_path: Path):
    from raiox_cli.catalogue import reindex

    info = synth.make_catalogue(tmp_path / "s", systems=2, views=2, queries=0, size=SMALL)
    ingest_catalogue(migrated, info.catalogue)
    before = _rows(migrated)
    moved = info.catalogue.rename(tmp_path / "moved")
    report = ingest_catalogue(migrated, moved)
    assert (report.embedded, report.unchanged, report.duplicates) == (0, 4, 0)
    assert _rows(migrated)["vectors"].keys() == before["vectors"].keys()
    nightly = reindex.reindex(migrated)
    assert nightly.ok and [r.root for r in nightly.roots] == [str(moved.resolve())]
    # A copy beside a catalogue that still exists is a duplicate, not a move.
    copy = shutil.copytree(moved, tmp_path / "copy")
    duplicate = ingest_catalogue(migrated, copy)
    assert (duplicate.duplicates, duplicate.embedded) == (4, 0)
    assert {r[6] for r in _rows(migrated)["images"]} == {
        str(p.relative_to(info.catalogue)) for p in info.catalogue_files
    }
