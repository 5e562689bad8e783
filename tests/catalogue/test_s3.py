"""A catalogue root in a bucket (s3://bucket/prefix) through a real S3 endpoint
(moto's server on loopback): the same rows as the same files in a folder."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.catalogue import reindex
from raiox_cli.catalogue import scan as catalogue
from raiox_cli.catalogue.ingest import IngestOptions, ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.training import synth
from tests.helpers.catalogue import assert_same_rows, catalogue_rows, upload_folder
from tests.helpers.env import fresh_database

SMALL = (64, 80)


def _upload(folder: Path, endpoint: str, bucket: str, prefix: str) -> list[str]:
    keys = upload_folder(folder, endpoint, bucket, prefix)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key=f"{prefix}/Acme/.hidden/x.png", Body=b"skipped")
    client.put_object(Bucket=bucket, Key=f"{prefix}/README.txt", Body=b"not an image")
    return keys


@pytest.mark.slow
def test_s3_root_gives_the_rows_of_the_same_folder(
    migrated: config.Settings, pg_server_url: str, s3_server: str, s3_bucket: str, tmp_path: Path
):
    migrated = config.resolve()  # with the bucket's RAIOX_S3_* settings
    info = synth.make_catalogue(tmp_path / "s", systems=3, views=2, queries=0, size=SMALL)
    _upload(info.catalogue, s3_server, s3_bucket, "library/v1")
    url = f"s3://{s3_bucket}/library/v1/"
    scanned = catalogue.scan(catalogue.open_root(url, migrated))
    assert str(scanned.root) == f"s3://{s3_bucket}/library/v1"
    assert sorted(f.rel for f in scanned.files) == sorted(
        p.relative_to(info.catalogue).as_posix() for p in info.catalogue_files
    )

    report = ingest_catalogue(migrated, url)
    assert (report.new, report.embedded, report.failed) == (6, 6, [])
    assert report.root == f"s3://{s3_bucket}/library/v1"
    again = ingest_catalogue(migrated, url)  # LastModified and size: nothing to read
    assert (again.unchanged, again.embedded, again.model_loaded) == (6, 0, False)

    local = migrated.replace(database_url=fresh_database(pg_server_url))
    db.migrate(local)
    ingest_catalogue(local, info.catalogue)
    assert_same_rows(catalogue_rows(migrated), catalogue_rows(local))

    # The same files in a folder beside a bucket that still has them: duplicates.
    beside = ingest_catalogue(migrated, info.catalogue)
    assert (beside.duplicates, beside.embedded) == (6, 0)


def test_s3_root_through_the_cli_and_reindex_prunes_a_deleted_object(
    migrated: config.Settings, s3_server: str, s3_bucket: str, tmp_path: Path
):
    migrated = config.resolve()  # with the bucket's RAIOX_S3_* settings
    info = synth.make_catalogue(tmp_path / "s", systems=2, views=2, queries=0, size=SMALL)
    keys = _upload(info.catalogue, s3_server, s3_bucket, "cat")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", f"s3://{s3_bucket}/cat", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["new"], summary["root"]) == (4, f"s3://{s3_bucket}/cat")

    gone = next(k for k in keys if k.endswith(".png"))
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").delete_object(
        Bucket=s3_bucket, Key=gone
    )
    nightly = reindex.reindex(migrated)
    assert nightly.ok and [(r.root, r.removed) for r in nightly.roots] == [
        (f"s3://{s3_bucket}/cat", 1)
    ]


def test_s3_root_problems_are_one_line(
    migrated: config.Settings, s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
):
    migrated = config.resolve()  # with the bucket's RAIOX_S3_* settings
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", "s3://raiox-no-such-bucket/cat"])
    assert result.exit_code == 2
    assert "s3://raiox-no-such-bucket/cat" in result.stderr
    assert "list failed" in result.stderr and "Traceback" not in result.stderr
    result = runner.invoke(app, ["ingest", "s3:///cat"])
    assert result.exit_code == 2 and "name the bucket" in result.stderr
    # Nothing under the prefix: an empty catalogue, not an error.
    report = ingest_catalogue(migrated, f"s3://{s3_bucket}/empty", IngestOptions(dry_run=True))
    assert (report.new, report.failed) == (0, [])
