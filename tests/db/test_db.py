from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from raiox_cli import config, db
from raiox_cli.db import queries
from raiox_cli.errors import DatabaseUnavailable, SchemaError


def _tables(settings: config.Settings) -> set[str]:
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in rows}


def test_migrate_fresh_database_creates_schema(raiox_env: config.Settings) -> None:
    report = db.migrate(raiox_env)
    assert report.applied == [f"{m.version:03d}_{m.name}" for m in db.load_migrations()]
    assert {
        "implants",
        "implant_images",
        "image_embeddings",
        "models",
        "settings",
        "analyses",
        "analysis_matches",
        "schema_migrations",
    } <= _tables(raiox_env)
    with db.connect(raiox_env) as conn:
        db.check_schema(conn)
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        assert ext.fetchone() is not None


def test_migrate_again_is_a_no_op(migrated: config.Settings) -> None:
    with db.connect(migrated) as conn:
        before = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    assert db.migrate(migrated).applied == []
    with db.connect(migrated) as conn:
        after = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    assert before == after


def test_newer_database_is_refused(migrated: config.Settings) -> None:
    with db.connect(migrated) as conn:
        queries.record_migration(conn, 999, "from_the_future")
        conn.commit()
        with pytest.raises(SchemaError, match="version 999"):
            db.check_schema(conn)
    with pytest.raises(SchemaError, match="upgrade raiox"):
        db.migrate(migrated)


def test_missing_schema_says_run_init_db(raiox_env: config.Settings) -> None:
    with (
        psycopg.connect(raiox_env.database_url) as conn,
        pytest.raises(SchemaError, match="init-db"),
    ):
        db.check_schema(conn)


@pytest.mark.slow
def test_external_url_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second embedded server stands in for an external PostgreSQL."""
    other = db.embedded_url(tmp_path / "other-pg")
    settings = config.resolve(
        env={"RAIOX_HOME": str(tmp_path / "home"), "RAIOX_DATABASE_URL": other}
    )
    assert db.migrate(settings).applied == [
        f"{m.version:03d}_{m.name}" for m in db.load_migrations()
    ]
    assert not (tmp_path / "home" / "pgdata").exists()  # the embedded default stayed untouched
    with psycopg.connect(other) as conn:
        latest = db.load_migrations()[-1].version
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (latest,)


def test_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    settings = config.resolve(
        env={
            "RAIOX_HOME": str(tmp_path),
            "RAIOX_DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x",
        }
    )
    with pytest.raises(DatabaseUnavailable) as info:
        db.connect(settings)
    assert "secret" not in str(info.value)
    assert "RAIOX_DATABASE_URL" in str(info.value)


def test_migrations_are_numbered_and_ordered() -> None:
    versions = [m.version for m in db.load_migrations()]
    assert versions == sorted(set(versions))
    assert versions[0] == 1


def test_register_model_creates_valid_hnsw_index(conn: psycopg.Connection) -> None:
    model = queries.register_model(conn, "raiox-tiny:none", 32, 1)
    conn.commit()
    assert queries.model_index_valid(conn, model)
    definition = conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = %s", (model.index_name,)
    ).fetchone()[0]
    assert "hnsw" in definition and "vector_cosine_ops" in definition


@pytest.mark.slow
def test_concurrent_processes_share_the_embedded_server(tmp_path: Path) -> None:
    """Several raiox processes at once on a fresh home: one server, one schema."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAIOX_DATABASE_URL"}
    env["RAIOX_HOME"] = str(tmp_path / "home")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "raiox_cli", "init-db"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    applied = [out for _, out, _ in results if "applied" in out]
    assert len(applied) == 1, results  # exactly one process migrated; the others found it done
    latest = db.load_migrations()[-1].version
    settings = config.resolve(env={"RAIOX_HOME": str(tmp_path / "home")})
    with db.connect(settings) as conn:
        assert queries.schema_version(conn) == latest


@pytest.mark.slow
def test_server_stops_after_a_killed_user_and_a_clean_exit(tmp_path: Path) -> None:
    """A raiox process killed with SIGKILL leaves its handle behind; the next one
    forgets it, so the embedded server still stops when the last user exits."""
    import subprocess
    import sys

    pgdata = tmp_path / "pgdata"
    start = f"import pathlib, raiox_cli.db as d\nd.embedded_url(pathlib.Path({str(pgdata)!r}))"
    suicide = "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    killed = subprocess.run([sys.executable, "-c", start + suicide])
    assert killed.returncode == -9
    assert (pgdata / "postmaster.pid").exists()  # orphaned server still running
    subprocess.run([sys.executable, "-c", start], check=True, timeout=60)
    assert not (pgdata / "postmaster.pid").exists()
