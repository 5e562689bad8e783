"""Content-addressed image storage: the local folder and S3 through a real endpoint."""

from __future__ import annotations

import hashlib
import stat
import urllib.request
from pathlib import Path

import boto3
import pytest

from raiox_cli import config
from raiox_cli.store import objects as storage


def _blob(text: str) -> tuple[str, bytes]:
    data = b"\x89PNG\r\n\x1a\n" + text.encode() * 100
    return hashlib.sha256(data).hexdigest(), data


def test_local_put_get_idempotent_private(tmp_path: Path) -> None:
    store = storage.open_store(config.resolve(env={"RAIOX_HOME": str(tmp_path)}))
    assert isinstance(store, storage.LocalStore)
    sha, data = _blob("implant")
    key = store.put(sha, data, content_type="image/png")
    assert key == f"sha256/{sha[:2]}/{sha}"
    assert store.put(sha, data) == key
    assert store.exists(key) and store.get(key) == data
    path = tmp_path / "objects" / key
    assert stat.S_IMODE((tmp_path / "objects").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert store.url(key) == path.resolve().as_uri()
    assert not list(path.parent.glob(".tmp-*"))
    assert "objects" in store.describe()


def test_local_refuses_wrong_hash_bad_key_and_missing(tmp_path: Path) -> None:
    store = storage.LocalStore(tmp_path)
    sha, data = _blob("a")
    with pytest.raises(storage.StorageError, match="hash to"):
        store.put(sha, data + b"x")
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    missing = storage.object_key("0" * 64)
    assert not store.exists(missing)
    with pytest.raises(storage.ObjectNotFound):
        store.get(missing)


def test_s3_put_get_presigned_private(s3_server: str, s3_bucket: str) -> None:
    store = storage.open_store(config.resolve())
    assert isinstance(store, storage.S3Store)
    assert store.describe() == f"s3://{s3_bucket} at {s3_server}"
    sha, data = _blob("spaces")
    key = store.put(sha, data, content_type="image/png")
    assert store.put(sha, data) == key  # the same bytes again: same key, no error
    assert store.exists(key) and store.get(key) == data
    assert not store.exists(storage.object_key("1" * 64))
    with pytest.raises(storage.ObjectNotFound):
        store.get(storage.object_key("1" * 64))
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    head = client.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentType"] == "image/png"
    grants = client.get_object_acl(Bucket=s3_bucket, Key=key)["Grants"]
    assert not [g for g in grants if "AllUsers" in str(g.get("Grantee", {}).get("URI", ""))]
    url = store.url(key, expires_s=60)
    assert "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    unsigned = url.split("?", 1)[0]
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(unsigned, timeout=10)


def test_s3_failure_is_a_named_error_after_retries(s3_server: str, s3_bucket: str) -> None:
    store = storage.S3Store(
        "no-such-bucket-raiox", endpoint=s3_server, region="us-east-1", attempts=2
    )
    sha, data = _blob("lost")
    with pytest.raises(
        storage.StorageError, match=r"s3://no-such-bucket-raiox/sha256/.*put failed"
    ):
        store.put(sha, data)
    dead = storage.S3Store(s3_bucket, endpoint="http://127.0.0.1:9", region="us-east-1", attempts=2)
    with pytest.raises(storage.StorageError, match="after 2 attempts"):
        dead.put(sha, data)
