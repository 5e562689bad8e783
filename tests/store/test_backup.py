"""raiox backup / restore / backup --verify: a real pg_dump of a real database,
restored into a fresh embedded home; and a backup taken while the webhook server
accepts submissions keeps every one acknowledged before it began."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from psycopg import sql
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.catalogue.ingest import ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.clinics import feedback
from raiox_cli.db import embedded
from raiox_cli.server.app import ServerConfig, create_app
from raiox_cli.store import backup
from raiox_cli.store import objects as storage
from raiox_cli.training import synth

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _rows(settings: config.Settings) -> dict[str, list[tuple]]:
    with db.connect(settings) as conn:
        return {
            "analyses": conn.execute(
                "SELECT id, source, status, image_sha256, storage_key, model_id, created_at, "
                "finished_at FROM analyses ORDER BY id"
            ).fetchall(),
            "matches": conn.execute(
                "SELECT analysis_id, rank, implant_id, image_id, score FROM analysis_matches "
                "ORDER BY analysis_id, rank"
            ).fetchall(),
        }


def _fingerprints(settings: config.Settings) -> dict[str, dict]:
    with db.connect(settings) as conn:
        return backup._fingerprints(conn)


@pytest.mark.slow
def test_backup_verify_restore_round_trip(
    migrated: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = synth.make_catalogue(tmp_path / "synth", systems=3, views=2, queries=1, size=(64, 80))
    assert ingest_catalogue(migrated, info.catalogue).ok
    answers = {}
    for query in info.query_files:
        answers[query] = json.loads(_ok(["search", str(query), "--json", "--save"]))
    first = answers[info.query_files[0]]
    feedback.confirm_analysis(migrated, first["analysis_id"], first["matches"][1]["key"])
    before, tables = _rows(migrated), _fingerprints(migrated)
    assert len(before["analyses"]) == len(info.query_files) and before["matches"]
    assert any(t.startswith("confirmation") and v["rows"] == 1 for t, v in tables.items())

    out = tmp_path / "backup"
    made = json.loads(_ok(["backup", str(out), "--json"]))
    assert made["ok"] and made["tables"] == len(tables)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["database"]["tables"] == tables  # counts and fingerprints of every table
    assert manifest["database"]["schema"] == db.load_migrations()[-1].version
    assert manifest["database"]["postgresql"] and manifest["database"]["pgvector"]
    stored = sorted(
        p.relative_to(migrated.storage_dir).as_posix()
        for p in migrated.storage_dir.rglob("*")
        if p.is_file()
    )
    assert [item["key"] for item in manifest["objects"]["items"]] == stored
    assert len(stored) == len(info.catalogue_files) + len(info.query_files)  # + saved queries

    verified = json.loads(_ok(["backup", "--verify", str(out), "--json"]))
    assert verified["ok"] and verified["rows"] == sum(t["rows"] for t in tables.values())

    fresh = Path(tempfile.mkdtemp(prefix="raiox-restore-"))
    monkeypatch.delenv("RAIOX_DATABASE_URL")
    monkeypatch.setenv("RAIOX_HOME", str(fresh / "home"))
    restored_settings = config.resolve()
    try:
        restored = json.loads(_ok(["restore", str(out), "--json"]))
        assert restored["ok"] and restored["objects"] == len(stored)
        assert _rows(restored_settings) == before
        assert _fingerprints(restored_settings) == tables
        for query, answer in answers.items():
            again = json.loads(_ok(["search", str(query), "--json"]))
            assert again["matches"] == answer["matches"]
        local = storage.open_store(restored_settings)
        assert all(local.exists(key) for key in stored)

        refused = runner.invoke(app, ["restore", str(out)])
        assert refused.exit_code == 1 and "--force" in refused.output
        _ok(["restore", str(out), "--force"])
        assert _rows(restored_settings) == before
    finally:
        embedded.leave(fresh / "home" / "pgdata")
        shutil.rmtree(fresh, ignore_errors=True)


@pytest.mark.slow
def test_verify_finds_a_damaged_backup(migrated: config.Settings, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    _ok(["backup", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["database"]["tables"]["schema_migrations"]["rows"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["backup", "--verify", str(out)])
    assert result.exit_code == 1 and "schema_migrations" in result.output
    (out / "database.dump").write_bytes(b"not a dump")
    result = runner.invoke(app, ["backup", "--verify", str(out)])
    assert result.exit_code == 1 and "sha256" in result.output


def test_backup_refuses_an_existing_folder(migrated: config.Settings, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = runner.invoke(app, ["backup", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "not empty" in result.output


def _fresh_database(pg_server_url: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, query = pg_server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


def test_backup_while_the_server_accepts_webhooks_keeps_every_acknowledged_one(
    migrated: config.Settings, tiny_embedder, pg_server_url: str, tmp_path: Path
) -> None:
    settings = migrated.replace(job_retry_base_s=0.2)
    store = storage.open_store(settings)
    server_app = create_app(
        ServerConfig(settings, tiny_embedder, store, insecure_no_auth=True, poll_s=0.2)
    )
    server = uvicorn.Server(uvicorn.Config(server_app, log_config=None, access_log=False))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)

    acked: list[tuple[float, str]] = []  # (when the 202 arrived, analysis public id)
    stop = threading.Event()

    def post() -> None:
        with httpx.Client(timeout=10) as client:
            n = 0
            while not stop.is_set():
                n += 1
                answer = client.post(
                    f"{base}/webhook",
                    # refused at download (loopback): the job fails fast, the row stays
                    json={"image_url": f"http://127.0.0.1:9/{n}.png", "client_id": "c"},
                )
                assert answer.status_code == 202, answer.text
                acked.append((time.monotonic(), answer.json()["id"]))

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    try:
        while len(acked) < 5:
            assert poster.is_alive()
            time.sleep(0.01)
        began = time.monotonic()
        report = backup.backup(settings, tmp_path / "backup")
        during = sum(1 for when, _ in acked if when >= began)
    finally:
        stop.set()
        poster.join(15)
        server.should_exit = True
        thread.join(30)
    assert report.problems == []
    acknowledged_before = {i for when, i in acked if when < began}

    target = settings.replace(database_url=_fresh_database(pg_server_url), home=tmp_path / "t")
    restored = backup.restore(target, tmp_path / "backup")
    assert restored.problems == []
    with db.connect(target) as conn:
        ids = {str(row[0]) for row in conn.execute("SELECT public_id FROM analyses")}
    assert acknowledged_before <= ids, sorted(acknowledged_before - ids)
    assert len(ids) == report.tables["analyses"]["rows"]
    print(f"acknowledged before: {len(acknowledged_before)}, during the backup: {during}")
