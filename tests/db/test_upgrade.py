"""Upgrade in place: a home built by the previous release (its migrations, as of commit
f7938bd, kept in data/release_f7938bd) holding a clinic, its key, analyses,
confirmations and sent notifications is migrated by today's code; everything still
answers, through the data layer, the CLI and the HTTP API, and the old key still
authenticates."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.cli import app
from raiox_cli.clinics import keys
from raiox_cli.db import queries
from raiox_cli.store import objects as storage
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import running

RELEASE = Path(__file__).parent / "data" / "release_f7938bd"
SHA = "ab" * 32


def build_previous_release(url: str) -> None:
    """What `raiox init-db` of that release did: each file once, in order, recorded."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        for path in sorted(RELEASE.glob("*.sql")):
            version, _, name = path.stem.partition("_")
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (int(version), name),
                )


def fill_previous_release(url: str, key: str) -> dict[str, Any]:
    """A clinic, its key, two analyses (one confirmed, with its e-mail and webhook
    notifications sent) and the catalogue rows they point at, in that release's
    tables: plain SQL, since today's queries speak the new schema."""
    with psycopg.connect(url) as conn:
        clinic_id = conn.execute(
            """INSERT INTO clients (name, key_hash, notify_url, email)
               VALUES ('sorriso-sp', %s, 'https://sorriso.example/hook', 'dr@sorriso.example')
               RETURNING id""",
            (keys.key_hash(key),),
        ).fetchone()[0]
        implant_id = conn.execute(
            """INSERT INTO implants (key, name, manufacturer, system, diameter_mm, length_mm)
               VALUES ('acme/alpha/a1', 'A1', 'Acme', 'Alpha', 4.1, 10) RETURNING id"""
        ).fetchone()[0]
        image_id = conn.execute(
            "INSERT INTO implant_images (implant_id, sha256) VALUES (%s, %s) RETURNING id",
            (implant_id, SHA),
        ).fetchone()[0]
        analyses = []
        for n, label in enumerate(("form-7", None)):
            analysis_id, public_id = conn.execute(
                """INSERT INTO analyses (source, client_id, clinic_id, idempotency_key,
                                         image_sha256, status, model_id, finished_at, lang)
                   VALUES ('webhook', %s, %s, %s, %s, 'done', 'ViT-B-32:test', now(), 'pt-BR')
                   RETURNING id, public_id""",
                (label, clinic_id, f"delivery-{n}", SHA),
            ).fetchone()
            conn.execute(
                """INSERT INTO analysis_matches (analysis_id, rank, implant_id, image_id,
                                                 implant_key, score)
                   VALUES (%s, 1, %s, %s, 'acme/alpha/a1', 0.93)""",
                (analysis_id, implant_id, image_id),
            )
            analyses.append((analysis_id, public_id))
        confirmed = analyses[0][0]
        conn.execute(
            """INSERT INTO confirmations (analysis_id, implant_id, implant_key, note, client_id)
               VALUES (%s, %s, 'acme/alpha/a1', 'seen on the CBCT', 'form-7')""",
            (confirmed, implant_id),
        )
        for channel, recipient in (("webhook", None), ("email", "dr@sorriso.example")):
            conn.execute(
                """INSERT INTO notifications (analysis_id, channel, recipient, status,
                                              attempts, sent_at)
                   VALUES (%s, %s, %s, 'sent', 1, now())""",
                (confirmed, channel, recipient),
            )
    return {"clinic_id": clinic_id, "implant_id": implant_id, "analyses": analyses}


def test_a_previous_release_home_upgrades_in_place(
    raiox_env: config.Settings, tiny_embedder: Any, tmp_path: Path
) -> None:
    key = keys.new_key()
    build_previous_release(raiox_env.database_url)
    before = fill_previous_release(raiox_env.database_url, key)

    report = db.migrate(raiox_env)
    assert "260_clinics_named" in report.applied

    with db.connect(raiox_env) as conn:
        db.check_schema(conn)
        clinic = keys.authenticate(conn, key)
        assert clinic is not None and clinic.name == "sorriso-sp"
        assert clinic.id == before["clinic_id"]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
        assert "clinics" in tables and "clients" not in tables
        (confirmed_id, confirmed_public), (_, other_public) = before["analyses"]
        found = queries.find_analysis(conn, confirmed_public, clinic_id=clinic.id)
        assert found is not None and found["id"] == confirmed_id
        assert queries.find_analysis(conn, other_public, clinic_id=clinic.id + 1) is None
        latest = queries.latest_confirmations(conn, client="sorriso-sp")
        assert [(r["analysis_id"], r["implant_key"]) for r in latest] == [
            (confirmed_id, "acme/alpha/a1")
        ]
        sent = {r["channel"]: r["status"] for r in queries.notifications_of(conn, confirmed_id)}
        assert sent == {"webhook": "sent", "email": "sent"}
        assert queries.email_recipient(conn, confirmed_id) == "dr@sorriso.example"
        # New rows keep numbering after the old ones (the renamed sequence).
        _, new_key = keys.add(conn, "clinica-rj")
        assert keys.find(conn, "clinica-rj")["id"] > clinic.id

    listed = CliRunner().invoke(app, ["clinics", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["sorriso-sp"]["analyses"] == 2 and set(rows) == {"sorriso-sp", "clinica-rj"}

    cat = Catalogue(raiox_env, storage.open_store(raiox_env), b"", [before["implant_id"]])
    with running(cat, tiny_embedder) as base:

        def get(path: str, key: str) -> httpx.Response:
            return httpx.get(base + path, headers={"authorization": f"Bearer {key}"})

        read = get(f"/analyses/{confirmed_public}", key)
        assert read.status_code == 200, read.text
        answer = read.json()
        assert answer["clinic"] == "sorriso-sp" and answer["status"] == "done"
        assert [m["key"] for m in answer["matches"]] == ["acme/alpha/a1"]
        items = get("/analyses", key).json()["items"]
        assert {i["id"] for i in items} == {str(confirmed_public), str(other_public)}
        assert get(f"/analyses/{confirmed_public}", new_key).status_code == 404
        assert get("/analyses", keys.new_key()).status_code == 401
        assert get(f"/analyses/{uuid.uuid4()}", key).status_code == 404
