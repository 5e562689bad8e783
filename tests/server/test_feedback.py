"""POST /analyses/{id}/feedback over real HTTP (uvicorn on loopback, the embedded
PostgreSQL, moto's S3), then the CLI reading what the server recorded."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from raiox_cli import db
from raiox_cli.cli import app
from raiox_cli.clinics import keys as clients
from raiox_cli.db import queries
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, running

runner = CliRunner()
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _keys(cat: Catalogue) -> list[str]:
    with db.connect(cat.settings) as conn:
        return [queries.get_implant(conn, i)["key"] for i in cat.implant_ids]


def test_feedback_over_http_then_eval_and_export(
    catalogue: Catalogue, tiny_embedder: Any, tmp_path: Path
) -> None:
    keys = _keys(catalogue)
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        upload = httpx.post(
            f"{base}/upload",
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            headers=AUTH,
            timeout=30,
        )
        assert upload.status_code == 200, upload.text
        analysis = upload.json()
        ranked = [m["key"] for m in analysis["matches"]]
        assert analysis["confirmation"] is None
        url = f"{base}/analyses/{analysis['id']}/feedback"

        first = httpx.post(
            url, json={"implant_key": ranked[0], "client_id": "dr-ana"}, headers=AUTH
        )
        assert first.status_code == 201, first.text
        answer = first.json()
        assert answer["implant"]["key"] == ranked[0] and answer["raiox_rank"] == 1
        assert answer["client_id"] == "dr-ana" and answer["previous"] is None

        # The dentist changes their mind: an implant raiox did not list, upper case.
        unlisted = next(k for k in keys if k not in ranked)
        second = httpx.post(
            url, json={"implant_key": unlisted.upper(), "note": "seen on the report"}, headers=AUTH
        )
        assert second.status_code == 201, second.text
        assert second.json()["implant"]["key"] == unlisted
        assert second.json()["raiox_rank"] is None
        assert second.json()["previous"]["implant"]["key"] == ranked[0]
        shown = httpx.get(f"{base}/analyses/{analysis['id']}", headers=AUTH).json()
        assert shown["confirmation"]["id"] == second.json()["id"]
        assert shown["confirmation"]["note"] == "seen on the report"

        refused = {
            "no token": httpx.post(url, json={"implant_key": ranked[0]}),
            "wrong token": httpx.post(
                url, json={"implant_key": ranked[0]}, headers={"authorization": "Bearer x"}
            ),
            "unknown analysis": httpx.post(
                f"{base}/analyses/999999/feedback", json={"implant_key": ranked[0]}, headers=AUTH
            ),
            "unknown implant": httpx.post(
                url, json={"implant_key": "nobody/none/nothing"}, headers=AUTH
            ),
            "both answers": httpx.post(
                url, json={"implant_key": ranked[0], "not_in_catalogue": True}, headers=AUTH
            ),
            "no answer": httpx.post(url, json={"note": "hm"}, headers=AUTH),
            "stray field": httpx.post(
                url, json={"implant_key": ranked[0], "patient": "Ana"}, headers=AUTH
            ),
            "long note": httpx.post(
                url, json={"not_in_catalogue": True, "note": "x" * 2001}, headers=AUTH
            ),
            "not json": httpx.post(url, content=b"implant=a", headers=AUTH),
            "huge body": httpx.post(url, content=b"{" + b" " * 20_000 + b"}", headers=AUTH),
            "id not a number": httpx.post(
                f"{base}/analyses/abc/feedback", json={"implant_key": ranked[0]}, headers=AUTH
            ),
        }
        status = {name: r.status_code for name, r in refused.items()}
        assert status == {
            "no token": 401,
            "wrong token": 401,
            "unknown analysis": 404,
            "unknown implant": 422,
            "both answers": 422,
            "no answer": 422,
            "stray field": 422,
            "long note": 422,
            "not json": 422,
            "huge body": 413,
            "id not a number": 404,  # ids are UUIDs: anything else names no analysis
        }
        assert "no implant 'nobody/none/nothing'" in refused["unknown implant"].json()["detail"]
        assert "one of them" in json.dumps(refused["both answers"].json()["detail"])
        schema = httpx.get(f"{base}/openapi.json").json()
        body = schema["paths"]["/v1/analyses/{analysis_id}/feedback"]["post"]["requestBody"]
        assert "implant_key" in body["content"]["application/json"]["schema"]["properties"]

    with db.connect(catalogue.settings) as conn:
        row = queries.find_analysis(conn, uuid.UUID(analysis["id"]), clinic_id=None)
        assert row is not None
        assert len(queries.confirmation_history(conn, row["id"])) == 2

    result = runner.invoke(app, ["eval", "--confirmed", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["analyses"] == 1 and report["top1"] == 0.0 and report["top5"] == 0.0
    assert report["confused"] == [{"expected": unlisted, "predicted": ranked[0], "count": 1}]

    out = tmp_path / "labels"
    result = runner.invoke(app, ["export-labels", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exported"] == 1
    (exported,) = [p for p in out.rglob("*.png")]
    assert exported.read_bytes() == catalogue.query_png  # read back from S3


def test_a_clinic_confirms_its_own_analyses_in_its_own_name(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    with db.connect(catalogue.settings) as conn:
        key_a = clients.add(conn, "sorriso-sp")[1]
        key_b = clients.add(conn, "outra-clinica")[1]
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        upload = httpx.post(
            f"{base}/upload",
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            headers={"authorization": f"Bearer {key_a}"},
            timeout=30,
        )
        assert upload.status_code == 200, upload.text
        analysis = upload.json()
        url = f"{base}/analyses/{analysis['id']}/feedback"
        key = analysis["matches"][0]["key"]
        spoof = {"implant_key": key, "client_id": "outra-clinica"}
        other = httpx.post(url, json=spoof, headers={"authorization": f"Bearer {key_b}"})
        missing = httpx.post(
            f"{base}/analyses/{uuid.uuid4()}/feedback",
            json=spoof,
            headers={"authorization": f"Bearer {key_b}"},
        )
        assert other.status_code == missing.status_code == 404
        mine = httpx.post(url, json=spoof, headers={"authorization": f"Bearer {key_a}"})
        assert mine.status_code == 201, mine.text
        # Who confirmed is the key's clinic, whatever the body says.
        assert mine.json()["client_id"] == "sorriso-sp"
        assert mine.json()["analysis_id"] == analysis["id"]
        operator = httpx.post(url, json={"implant_key": key, "client_id": "dr-ana"}, headers=AUTH)
        assert operator.status_code == 201 and operator.json()["client_id"] == "dr-ana"
        assert operator.json()["previous"]["analysis_id"] == analysis["id"]  # never internal
