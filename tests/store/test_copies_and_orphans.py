"""Object copies in a second location (backup --objects-to: incremental by sha256,
brought back by restore, checked by --verify) and the orphan sweep (nightly reindex,
backup --verify), through the real CLI on a real S3 protocol (moto on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.catalogue.ingest import ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.store import objects as storage
from raiox_cli.training import synth
from tests.helpers.env import fresh_database

runner = CliRunner()


def _ok(args: list[str], env: dict[str, str] | None = None) -> dict:
    result = runner.invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _bucket(endpoint: str) -> str:
    name = "copies-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.mark.slow
def test_s3_objects_are_copied_incrementally_restored_and_verified(
    s3_bucket: str, s3_server: str, migrated: config.Settings, tmp_path: Path, pg_server_url: str
) -> None:
    settings = config.resolve()
    info = synth.make_catalogue(tmp_path / "synth", systems=3, views=2, queries=1, size=(64, 80))
    assert ingest_catalogue(settings, info.catalogue).ok
    store = storage.open_store(settings)
    keys = sorted(o["Key"] for o in store.client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert len(keys) == len(info.catalogue_files)
    copies = _bucket(s3_server)

    first = _ok(["backup", str(tmp_path / "b1"), "--objects-to", f"s3://{copies}"])
    assert first["ok"] and first["copied"] == len(keys) and first["already_copied"] == 0
    # Nothing new: nothing copied. A saved search adds one object: one copied.
    again = _ok(["backup", str(tmp_path / "b2"), "--objects-to", f"s3://{copies}"])
    assert again["copied"] == 0 and again["already_copied"] == len(keys)
    _ok(["search", str(info.query_files[0]), "--save"])
    third = _ok(["backup", str(tmp_path / "b3"), "--objects-to", f"s3://{copies}"])
    assert third["copied"] == 1 and third["objects"] == len(keys) + 1
    manifest = json.loads((tmp_path / "b3" / "manifest.json").read_text())
    assert manifest["objects"]["copies"]["to"] == f"s3://{copies}"
    assert not (tmp_path / "b3" / "objects").exists()

    verified = _ok(["backup", "--verify", str(tmp_path / "b3")])
    assert verified["ok"] and verified["objects"] == len(keys) + 1 and verified["orphaned"] == 0

    # Restore into another database and an empty bucket: the objects come back from
    # the copies, byte for byte.
    target = _bucket(s3_server)
    env = {"RAIOX_DATABASE_URL": fresh_database(pg_server_url), "RAIOX_S3_BUCKET": target}
    restored = _ok(["restore", str(tmp_path / "b3")], env=env)
    assert restored["ok"] and restored["objects"] == len(keys) + 1
    back = storage.S3Store(target, endpoint=s3_server, region="us-east-1")
    for item in manifest["objects"]["items"]:
        assert hashlib.sha256(back.get(item["key"])).hexdigest() == item["sha256"]

    # A copy lost or damaged in the second location: --verify names it and exits 1.
    lost, damaged = manifest["objects"]["items"][0]["key"], manifest["objects"]["items"][1]["key"]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.delete_object(Bucket=copies, Key=lost)
    client.put_object(Bucket=copies, Key=damaged, Body=b"not the image")
    failed = runner.invoke(app, ["backup", "--verify", str(tmp_path / "b3")])
    assert failed.exit_code == 1
    assert f"{lost} is missing from s3://{copies}" in failed.output
    assert f"{damaged} in s3://{copies}" in failed.output and "sha256" in failed.output


@pytest.mark.slow
def test_a_local_folder_keeps_copies_across_backups(
    migrated: config.Settings, tmp_path: Path
) -> None:
    info = synth.make_catalogue(tmp_path / "synth", systems=2, views=2, queries=0, size=(64, 80))
    assert ingest_catalogue(migrated, info.catalogue).ok
    folder = tmp_path / "copies"
    first = _ok(["backup", str(tmp_path / "b1"), "--objects-to", str(folder)])
    second = _ok(["backup", str(tmp_path / "b2"), "--objects-to", str(folder)])
    assert first["copied"] == 4 and second["copied"] == 0 and second["already_copied"] == 4
    copied = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert copied == sorted(p.name for p in migrated.storage_dir.rglob("*") if p.is_file())
    assert _ok(["backup", "--verify", str(tmp_path / "b2")])["ok"]


def _orphan(store: storage.LocalStore, content: bytes, age_s: float) -> str:
    key = store.put(hashlib.sha256(content).hexdigest(), content)
    then = time.time() - age_s
    os.utime(store.root / key, (then, then))
    return key


@pytest.mark.slow
def test_reindex_sweeps_orphans_past_the_grace_period_and_verify_counts_them(
    migrated: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = synth.make_catalogue(tmp_path / "synth", systems=2, views=2, queries=0, size=(64, 80))
    assert ingest_catalogue(migrated, info.catalogue).ok
    store = storage.LocalStore(migrated.storage_dir)
    old = _orphan(store, b"an image whose analysis was deleted mid-download", 3 * 3600)
    young = _orphan(store, b"an image whose row is being written right now", 60)
    backed = _ok(["backup", str(tmp_path / "b")])
    assert backed["objects"] == 6
    assert _ok(["backup", "--verify", str(tmp_path / "b")])["orphaned"] == 2

    monkeypatch.setenv("RAIOX_ORPHAN_GRACE_S", "3600")
    swept = _ok(["reindex"])["orphans"]
    assert swept == {
        "objects": 6,
        "referenced": 4,
        "orphaned": 2,
        "removed": 1,
        "in_grace_period": 1,
        "grace_s": 3600.0,
    }
    assert not store.exists(old) and store.exists(young)
    with db.connect(migrated) as conn:
        named = {r[0] for r in conn.execute("SELECT storage_key FROM implant_images")}
    assert all(store.exists(key) for key in named)  # nothing a row names is touched
