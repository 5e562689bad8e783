"""Shared fixtures: one embedded PostgreSQL per test session, a fresh database per
test that needs one, and the tiny open_clip model (random weights, same code path)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from raiox_cli import config, db

TINY_ENV = {
    # torch: most tests make a fresh RAIOX_HOME, where the ONNX backend would export
    # the model again each time. tests/test_onnx.py runs the ONNX path through the CLI;
    # RAIOX_TEST_BACKEND=onnx runs the whole suite on it.
    "RAIOX_BACKEND": os.environ.get("RAIOX_TEST_BACKEND", "torch"),
    "RAIOX_MODEL": "raiox-tiny",
    "RAIOX_PRETRAINED": "none",
    "RAIOX_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's embedded server (stopped by pgserver when the process exits)."""
    return db.embedded_url(tmp_path_factory.mktemp("pg") / "data")


def _database_url(server_url: str, name: str) -> str:
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the session server."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _database_url(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def raiox_env(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> config.Settings:
    """Environment for a raiox process: its own home and database, the tiny model."""
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAIOX_DATABASE_URL", database_url)
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAIOX_WEIGHTS", raising=False)
    return config.resolve()


@pytest.fixture
def migrated(raiox_env: config.Settings) -> config.Settings:
    db.migrate(raiox_env)
    return raiox_env


@pytest.fixture
def conn(migrated: config.Settings) -> Iterator[psycopg.Connection]:
    with db.connect(migrated) as connection:
        yield connection


@pytest.fixture(scope="session")
def tiny_embedder():
    from raiox_cli import embedding

    return embedding.load_embedder(embedding.ModelSpec("raiox-tiny", "none", None, "cpu"))


# --- S3 (moto in server mode: a real HTTP endpoint on loopback) ---------------------

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The session's moto S3 server; yields its endpoint URL (http://127.0.0.1:PORT)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh private bucket on the moto server, with RAIOX_S3_* and fake AWS
    credentials in the environment (so config.resolve() picks S3 storage)."""
    import boto3

    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    name = "raiox-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    monkeypatch.setenv("RAIOX_S3_BUCKET", name)
    monkeypatch.setenv("RAIOX_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("RAIOX_S3_REGION", "us-east-1")
    return name


def upload_folder(folder: Path, endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Copy a folder's files to s3://bucket/prefix/...; returns the keys."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
    return keys


def store_synthetic_catalogue(conn, embedder, info, store=None) -> list[int]:
    """Write a synth.make_catalogue() result through the data layer, embedded by the
    real (tiny) model: the rows ingest writes. Returns the implant ids in order;
    with a store, each image's bytes go there and rows carry its key."""
    from raiox_cli import images
    from raiox_cli.db import queries

    model = queries.register_model(conn, embedder.model_id, embedder.dim, 1)
    implant_ids, pairs = [], []
    for implant in info.implants:
        d = implant.design
        implant_id = queries.upsert_implant(
            conn,
            {
                "key": implant.key,
                "name": d.name,
                "manufacturer": d.manufacturer,
                "system": d.system,
                "diameter_mm": d.diameter_mm,
                "length_mm": d.length_mm,
                "connection": d.connection,
            },
        )
        implant_ids.append(implant_id)
        for path in implant.views:
            data = path.read_bytes()
            loaded = images.load_image(data)
            row = {"implant_id": implant_id, "sha256": loaded.sha256, "source_path": str(path)}
            if store is not None:
                row["storage_key"] = store.put(loaded.sha256, data, content_type="image/png")
            vector = embedder.embed_images([loaded.image])[0]
            pairs.append((queries.upsert_image(conn, row), vector))
    queries.copy_embeddings(conn, model.model_id, pairs)
    queries.activate_model(conn, model.model_id)
    queries.analyze_embeddings(conn)
    conn.commit()
    return implant_ids


# --- comparing what two runs left in their databases ----------------------------------


def fresh_database(pg_server_url: str) -> str:
    """Another empty database on the session server (for a second, clean run)."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _database_url(pg_server_url, name)


def catalogue_rows(settings: config.Settings) -> dict:
    """What an ingest leaves behind, independent of ids, timestamps and where the
    catalogue root is: implants, images (key, sha256, source path, storage key, size)
    and each image's vectors by (implant key, sha256, model)."""
    from raiox_cli.db import queries

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
        implants = conn.execute("SELECT key, extra FROM implants").fetchall()
        active = queries.active_model(conn)
    return {
        "images": sorted(images),
        "implants": sorted(implants, key=lambda r: r[0]),
        "vectors": {(k, s, m): v.to_numpy() for k, s, m, v in vectors},
        "active": active.model_id if active else None,
    }


def assert_same_rows(got: dict, want: dict, atol: float = 1e-5) -> None:
    import numpy as np

    assert got["images"] == want["images"]
    assert got["implants"] == want["implants"]
    assert got["active"] == want["active"]
    assert got["vectors"].keys() == want["vectors"].keys()
    for key, vector in want["vectors"].items():
        np.testing.assert_allclose(got["vectors"][key], vector, atol=atol)


# --- Ray (the `ray` engine): one local instance per session ------------------------------


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A local Ray instance with 2 CPUs for the whole session; yields its address so
    a subprocess driver can join it (RAY_ADDRESS). Its workers get the fake S3
    credentials (they are started now, before any test sets its environment)."""
    import logging

    import ray

    ray.init(
        num_cpus=2,
        num_gpus=0,
        object_store_memory=256 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": dict(S3_CREDENTIALS)},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# --- a real browser (Debian's chromium, driven by Playwright): one per session -------

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_path() -> str | None:
    import os
    import shutil

    candidates = [os.environ.get("RAIOX_TEST_CHROMIUM"), "chromium", "chromium-browser"]
    for name in candidates:
        found = name and (shutil.which(name) or (os.path.isfile(name) and name))
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium for the page tests. Skipped, saying why, only when it is
    not installed (.ci/run installs Debian's chromium with apt-get)."""
    import warnings

    executable = chromium_path()
    why = None
    if executable is None:
        why = "chromium is not installed (apt-get install chromium; .ci/run does it)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            why = "playwright is not installed (pip install -e '.[dev]')"
    if why:
        warnings.warn(f"BROWSER TESTS SKIPPED: {why}", stacklevel=1)
        pytest.skip(f"BROWSER TESTS SKIPPED: {why}")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield chromium
        chromium.close()
