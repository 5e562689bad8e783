"""Shared fixtures: one embedded PostgreSQL per test session, a fresh database per
test that needs one, the tiny open_clip model (random weights, same code path), moto's
S3 server, a small catalogue in both, and one local Ray. Helpers that tests import live
in tests/helpers/; the server's fixtures (a local web site, SMTP, a browser) in
tests/server/conftest.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from raiox_cli import config, db
from raiox_cli.store import objects as storage
from raiox_cli.training import synth
from tests.helpers.catalogue import Catalogue, store_synthetic_catalogue
from tests.helpers.env import S3_CREDENTIALS, TINY_ENV, database_url_on

# One math thread per test process (and the subprocesses it starts, which inherit it).
# The tiny model gains nothing from a second thread, and on a shared 2-core machine
# torch's spinning worker threads made each single-image embed ~30x slower (0.1 s
# instead of 3 ms), most of the fast loop's time. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SLOW_KINDS = ("browser", "ray", "training")
# A test that asks for these fixtures is of that kind, whether or not it says so.
KIND_OF_FIXTURE = {"browser": "browser", "ray_address": "ray"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A browser, Ray or a training run is slow whatever the test, so the fast loop
    (`-m "not slow"`) leaves them out without each test saying so twice."""
    for item in items:
        for fixture, kind in KIND_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(kind)
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's embedded server (stopped by pgserver when the process exits)."""
    return db.embedded_url(tmp_path_factory.mktemp("pg") / "data")


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the session server."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield database_url_on(pg_server_url, name)
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


# S3: moto in server mode, a real HTTP endpoint on loopback.


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


@pytest.fixture
def catalogue(
    migrated: config.Settings, s3_bucket: str, tiny_embedder, tmp_path: Path
) -> Catalogue:
    """A small catalogue built with the tiny model, its images in moto's S3."""
    settings = config.resolve()  # now with RAIOX_S3_* from s3_bucket
    store = storage.open_store(settings)
    info = synth.make_catalogue(tmp_path / "synth", systems=4, views=2, queries=1, size=(96, 120))
    with db.connect(settings) as conn:
        implant_ids = store_synthetic_catalogue(conn, tiny_embedder, info, store)
    return Catalogue(settings, store, info.query_files[0].read_bytes(), implant_ids)


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
