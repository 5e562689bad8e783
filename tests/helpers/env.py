"""The environment of a raiox process under test: the tiny model, no network, and
databases on the session's embedded server."""

from __future__ import annotations

import os
import uuid

import psycopg
from psycopg import sql

TINY_ENV = {
    # torch: most tests make a fresh RAIOX_HOME, where the ONNX backend would export
    # the model again each time. tests/embedding/test_onnx.py runs the ONNX path through
    # the CLI; RAIOX_TEST_BACKEND=onnx runs the whole suite on it.
    "RAIOX_BACKEND": os.environ.get("RAIOX_TEST_BACKEND", "torch"),
    "RAIOX_MODEL": "raiox-tiny",
    "RAIOX_PRETRAINED": "none",
    "RAIOX_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
}

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def database_url_on(server_url: str, name: str) -> str:
    """The URL of database `name` on the server at `server_url`."""
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


def fresh_database(pg_server_url: str) -> str:
    """Another empty database on the session server (for a second, clean run)."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url_on(pg_server_url, name)
