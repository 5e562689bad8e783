"""Retention over the real stack: `raiox purge` against moto's S3 server and the
embedded PostgreSQL (dry run first), RAIOX_RETENTION_DAYS in the nightly reindex,
and DELETE /analyses/{id} over HTTP, scoped by clinic."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import boto3
import httpx
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.cli import app
from raiox_cli.clinics import keys as clients
from raiox_cli.db import queries
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, running

runner = CliRunner()


def objects(cat: Catalogue) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=cat.settings.s3_endpoint, region_name="us-east-1")
    listing = s3.list_objects_v2(Bucket=cat.settings.s3_bucket)
    return {o["Key"] for o in listing.get("Contents", [])}


def analysis(
    cat: Catalogue, data: bytes, *, clinic_id: int | None, age_days: int
) -> tuple[int, str]:
    """An analysis whose image is in S3, created age_days ago; (id, storage key)."""
    key = cat.store.put(hashlib.sha256(data).hexdigest(), data)
    with db.connect(cat.settings) as conn:
        analysis_id, _ = queries.create_analysis(
            conn, source="upload", clinic_id=clinic_id, storage_key=key, status="done"
        )
        conn.execute(
            "UPDATE analyses SET created_at = now() - make_interval(days => %s) WHERE id = %s",
            (age_days, analysis_id),
        )
        conn.commit()
    return analysis_id, key


def rows(cat: Catalogue) -> set[int]:
    with db.connect(cat.settings) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM analyses")}


def purge(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["purge", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_purge_dry_run_then_per_client_then_all(catalogue: Catalogue) -> None:
    with db.connect(catalogue.settings) as conn:
        a = clients.add(conn, "clinic-a")[0]["id"]
        b = clients.add(conn, "clinic-b")[0]["id"]
    catalogue_objects = objects(catalogue)
    old_a, key_old_a = analysis(catalogue, b"old a", clinic_id=a, age_days=100)
    old_b, key_old_b = analysis(catalogue, b"old b", clinic_id=b, age_days=100)
    new_a, key_shared = analysis(catalogue, b"same x-ray", clinic_id=a, age_days=5)
    old_shared, _ = analysis(catalogue, b"same x-ray", clinic_id=a, age_days=120)
    ops, key_ops = analysis(catalogue, b"operator's", clinic_id=None, age_days=91)
    every = {old_a, old_b, new_a, old_shared, ops}
    before = objects(catalogue)
    assert {key_old_a, key_old_b, key_shared, key_ops} <= before

    dry = purge("--older-than", "90d", "--dry-run")
    assert (dry["analyses"], dry["objects"], dry["dry_run"]) == (4, 3, True)
    assert rows(catalogue) == every and objects(catalogue) == before

    only_a = purge("--older-than", "90d", "--client", "clinic-a")
    assert (only_a["analyses"], only_a["objects"]) == (2, 1)
    assert rows(catalogue) == {old_b, new_a, ops}
    assert key_old_a not in objects(catalogue)
    assert key_shared in objects(catalogue)  # a newer analysis still shows it

    rest = purge("--older-than", "90d")
    assert (rest["analyses"], rest["objects"]) == (2, 2)
    assert rows(catalogue) == {new_a}
    assert objects(catalogue) == catalogue_objects | {key_shared}  # catalogue untouched

    with db.connect(catalogue.settings) as conn:
        counts = conn.execute(
            "SELECT clinic_id, sum(analyses) FROM analysis_counts GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert counts == [(0, 1), (a, 2), (b, 1)]  # anonymous counts stay for statistics
    listed = json.loads(runner.invoke(app, ["clients", "list", "--json"]).stdout)
    assert {c["name"]: (c["analyses"], c["purged"]) for c in listed} == {
        "clinic-a": (1, 2),
        "clinic-b": (0, 1),
    }
    unknown = runner.invoke(app, ["purge", "--older-than", "90d", "--client", "nobody"])
    assert unknown.exit_code == 1 and "no client named 'nobody'" in unknown.stderr
    bad = runner.invoke(app, ["purge", "--older-than", "ninety"])
    assert bad.exit_code == 2 and "90d" in bad.stderr


def test_nightly_reindex_applies_retention_days(
    catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, key_old = analysis(catalogue, b"old", clinic_id=None, age_days=31)
    new, _ = analysis(catalogue, b"new", clinic_id=None, age_days=29)
    result = runner.invoke(app, ["reindex", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["purged"] is None and rows(catalogue) == {old, new}
    monkeypatch.setenv("RAIOX_RETENTION_DAYS", "30")
    result = runner.invoke(app, ["reindex", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["purged"]["analyses"] == 1
    assert rows(catalogue) == {new} and key_old not in objects(catalogue)


def test_a_clinic_deletes_its_own_analysis_only(
    catalogue: Catalogue, tiny_embedder: Any, capsys: pytest.CaptureFixture
) -> None:
    with db.connect(catalogue.settings) as conn:
        key_a = clients.add(conn, "clinic-a")[1]
        key_b = clients.add(conn, "clinic-b")[1]
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        made = httpx.post(
            f"{base}/upload",
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            headers={"x-raiox-key": key_a},
            timeout=30,
        ).json()
        url = f"{base}/analyses/{made['id']}"
        with db.connect(catalogue.settings) as conn:
            row = queries.find_analysis(conn, uuid.UUID(made["id"]), clinic_id=None)
        assert row is not None and row["storage_key"] in objects(catalogue)
        assert httpx.delete(url, headers={"x-raiox-key": key_b}).status_code == 404
        assert httpx.get(url, headers={"x-raiox-key": key_a}).status_code == 200
        gone = httpx.delete(url, headers={"x-raiox-key": key_a})
        assert gone.status_code == 204
        assert httpx.get(url, headers={"x-raiox-key": key_a}).status_code == 404
        assert httpx.delete(url, headers={"x-raiox-key": key_a}).status_code == 404
        assert httpx.delete(url, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert row["storage_key"] not in objects(catalogue)
    logged = capsys.readouterr().err
    assert f'"action": "delete", "client": "clinic-a", "analysis": "{made["id"]}"' in logged


def test_settings_parse_retention_days(tmp_path: Any) -> None:
    settings = config.resolve(env={"RAIOX_HOME": str(tmp_path), "RAIOX_RETENTION_DAYS": "90"})
    assert settings.retention_days == 90
    assert config.resolve(env={"RAIOX_HOME": str(tmp_path)}).retention_days is None
