"""`raiox clients`: keys made once, stored as hashes, rotated with a grace period,
revoked at once; nothing secret ever printed by `list`."""

from __future__ import annotations

import json
import time

from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.cli import app
from raiox_cli.clinics import keys as clients

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def who(settings: config.Settings, key: str) -> str | None:
    with db.connect(settings) as conn:
        clinic = clients.authenticate(conn, key)
    return clinic.name if clinic else None


def test_add_prints_the_key_once_and_stores_only_its_hash(migrated: config.Settings) -> None:
    code, stdout, stderr = invoke("clients", "add", "sorriso-sp", "--email", "dr@sorriso.example")
    assert code == 0, stderr
    key = stdout.strip()
    assert clients.looks_like_key(key) and len(key) == 47  # rxk_ + 256 bits in base64url
    assert "shown only now" in stderr
    assert who(migrated, key) == "sorriso-sp"
    with db.connect(migrated) as conn:
        stored = conn.execute("SELECT key_hash, previous_key_hash FROM clinics").fetchone()
        dump = str(conn.execute("SELECT * FROM clinics").fetchall())
    assert stored == (clients.key_hash(key), None)
    assert key not in dump and key[4:] not in dump

    code, stdout, _ = invoke("clients", "add", "clinica-rj", "--json")
    added = json.loads(stdout)
    assert code == 0 and added["name"] == "clinica-rj" and clients.looks_like_key(added["key"])
    assert added["key"] != key

    code, _, stderr = invoke("clients", "add", "sorriso-sp")
    assert code == 1 and "exists" in stderr and "rotate" in stderr
    code, _, stderr = invoke("clients", "add", "x", "--notify-url", "ftp://nope")
    assert code == 2 and "--notify-url" in stderr


def test_list_shows_usage_never_keys(migrated: config.Settings) -> None:
    _, key_a, _ = invoke("clients", "add", "a-clinic", "--notify-url", "https://a.example/hook")
    _, key_b, _ = invoke("clients", "add", "b-clinic")
    who(migrated, key_a.strip())  # marks a-clinic as used
    code, stdout, _ = invoke("clients", "list", "--json")
    assert code == 0
    listed = {row["name"]: row for row in json.loads(stdout)}
    assert set(listed) == {"a-clinic", "b-clinic"}
    assert listed["a-clinic"]["last_used_at"] is not None
    assert listed["b-clinic"]["last_used_at"] is None
    assert listed["a-clinic"]["analyses"] == 0 and listed["a-clinic"]["state"] == "active"
    assert listed["a-clinic"]["notify_url"] == "https://a.example/hook"
    code, table, _ = invoke("clients", "list")
    assert code == 0 and "a-clinic" in table and "never" in table
    for text in (stdout, table):
        for key in (key_a.strip(), key_b.strip()):
            assert key not in text and key[4:12] not in text
        assert "hash" not in text


def test_rotate_keeps_the_old_key_for_the_grace_period(migrated: config.Settings) -> None:
    _, old, _ = invoke("clients", "add", "rot")
    old = old.strip()
    code, new, stderr = invoke("clients", "rotate", "rot", "--grace", "2s")
    new = new.strip()
    assert code == 0 and clients.looks_like_key(new) and new != old, stderr
    assert who(migrated, new) == "rot" and who(migrated, old) == "rot"
    _, listed, _ = invoke("clients", "list", "--json")
    assert json.loads(listed)[0]["state"].startswith("rotating")
    time.sleep(2.2)
    assert who(migrated, old) is None and who(migrated, new) == "rot"

    code, newer, _ = invoke("clients", "rotate", "rot", "--grace", "0s")
    assert code == 0 and who(migrated, new) is None and who(migrated, newer.strip()) == "rot"
    code, _, stderr = invoke("clients", "rotate", "rot", "--grace", "soon")
    assert code == 2 and "90d, 24h" in stderr
    code, _, stderr = invoke("clients", "rotate", "nobody")
    assert code == 1 and "no client named 'nobody'" in stderr


def test_revoke_stops_every_key_at_once(migrated: config.Settings) -> None:
    _, old, _ = invoke("clients", "add", "gone")
    _, new, _ = invoke("clients", "rotate", "gone")  # old still in its 24 h grace
    assert who(migrated, old.strip()) == "gone"
    code, stdout, _ = invoke("clients", "revoke", "gone")
    assert code == 0 and "revoked gone" in stdout
    assert who(migrated, old.strip()) is None and who(migrated, new.strip()) is None
    code, _, stderr = invoke("clients", "rotate", "gone")
    assert code == 1 and "revoked" in stderr
    _, listed, _ = invoke("clients", "list", "--json")
    assert json.loads(listed)[0]["state"] == "revoked"


def test_keys_are_checked_by_hash_and_shape(migrated: config.Settings) -> None:
    with db.connect(migrated) as conn:
        _, key = clients.add(conn, "shape")
        assert clients.authenticate(conn, key) is not None
        assert clients.authenticate(conn, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert clients.authenticate(conn, "rxk_short") is None
        assert clients.authenticate(conn, "") is None
        assert clients.new_key() != clients.new_key()


def test_clients_needs_a_schema(raiox_env: config.Settings) -> None:
    code, _, stderr = invoke("clients", "list")
    assert code == 3 and "init-db" in stderr


def test_help_has_examples() -> None:
    for command in ("add", "list", "rotate", "revoke"):
        code, stdout, _ = invoke("clients", command, "--help")
        assert code == 0 and "Example: " in stdout


def test_migration_gives_existing_analyses_distinct_public_ids(database_url: str) -> None:
    import psycopg

    with psycopg.connect(database_url) as conn:
        for migration in db.load_migrations():
            if migration.version >= 5:
                break
            conn.execute(migration.sql)
        conn.execute(
            "INSERT INTO analyses (source, status) SELECT 'cli', 'done' FROM generate_series(1, 50)"
        )
        conn.execute(next(m for m in db.load_migrations() if m.version == 5).sql)
        ids = [r[0] for r in conn.execute("SELECT public_id FROM analyses")]
    assert len(ids) == 50 and len(set(ids)) == 50
    assert all(i is not None and i.version == 4 for i in ids)
