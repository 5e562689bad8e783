"""The OpenAPI schema tells the truth: schemathesis's own command (`st run`) tests
every operation from /openapi.json against the real server with all its checks, in
positive and negative modes, through its examples, coverage, fuzzing and stateful
phases, once as a clinic (with a second clinic as its peer) and once as the
operator; the run must find nothing. No check is disabled. And a client generated
from the same schema by openapi-python-client submits an X-ray and reads the
analysis."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from raiox_cli import db
from raiox_cli.clinics import keys, links
from tests.helpers import contract
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, Site, poll, running

pytestmark = pytest.mark.slow

AUTH = {"authorization": f"Bearer {TOKEN}"}
# Bounded and derandomised: the same requests on every run, about a minute per
# identity on 2 shared cores.
EXAMPLES_PER_OPERATION = 20
# `st`, run by this interpreter: no PATH or venv bin/ assumed.
ST = (sys.executable, "-m", "schemathesis.cli")


def no_empty_schemas(document: dict[str, Any]) -> list[str]:
    empty = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status == "204":  # No Content: nothing to describe
                    continue
                for media, content in (response.get("content") or {"-": {}}).items():
                    if not content.get("schema"):
                        empty.append(f"{method.upper()} {path} {status} {media}")
    return empty


def schemathesis_config(credential: str | Path, image_token: str) -> str:
    """Every check is on (`st run`'s default, said again here so that a change of
    default cannot quietly drop one). `credential`: the operator token, or a Web
    Fuzzing Commons file of two clinics' keys; the first clinic makes the requests
    and the second is its peer, whom object_level_authorization replays every read
    as (another clinic's analysis must be a 404). Per operation: /metrics is the
    operator's, so it gets the operator token whoever the run is; /images/{token}
    gets a genuine signed link (the link is its credential: drawn tokens could only
    ever be 404)."""
    who = (
        f'[auth.wfc]\npath = "{credential}"\nuser = "clinic-a"\npeers = ["clinic-a", "clinic-b"]'
        if isinstance(credential, Path)
        else f'headers = {{ Authorization = "Bearer {credential}" }}'
    )
    return f"""
workers = 1
{who}

[checks]
enabled = true

[generation]
mode = "all"
max-examples = {EXAMPLES_PER_OPERATION}
deterministic = true
database = "none"

[[operations]]
include-path = "/v1/metrics"
headers = {{ Authorization = "Bearer {TOKEN}" }}

[[operations]]
include-path = "/v1/images/{{token}}"
parameters = {{ token = "{image_token}" }}
"""


@pytest.mark.parametrize("identity", ["clinic keys", "operator token"])
def test_contract_run_finds_nothing(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, tmp_path: Path, identity: str
) -> None:
    with db.connect(catalogue.settings) as conn:
        clinic_keys = [keys.add(conn, name)[1] for name in ("clinica-a", "clinica-b")]
    credential: str | Path = TOKEN
    owner = TOKEN if identity == "operator token" else clinic_keys[0]
    if identity == "clinic keys":
        credential = tmp_path / "clinics.json"
        credential.write_text(json.dumps(wfc_users(clinic_keys)))
    site.routes["/xray.png"] = (200, catalogue.query_png, {"content-type": "image/png"})
    server = {
        "webhook_token": TOKEN,
        # Its deliberate bad credentials would otherwise turn most requests into 429s.
        "auth_max_failures": 1_000_000,
        # Drawn image URLs are refused before any lookup; the site's X-ray downloads.
        "download_allow_hosts": "127.0.0.1",
        "download_allow_loopback": True,
    }
    with running(catalogue, tiny_embedder, **server) as base:
        # Something to find: one analysis done, so reads and feedback reach real rows.
        done = httpx.post(
            f"{base}/v1/upload",
            files={"file": ("q.png", catalogue.query_png)},
            headers={"authorization": f"Bearer {owner}"},
        )
        assert done.status_code == 200, done.text
        document = httpx.get(f"{base}/openapi.json").json()
        assert no_empty_schemas(document) == []
        assert all(path.startswith("/v1/") for path in document["paths"])
        assert document["paths"]["/v1/healthcheck"]["get"]["security"] == []
        assert "bearer" in document["components"]["securitySchemes"]
        operations = sum(len(ops) for ops in document["paths"].values())

        image_token = links.sign_image(
            links.image_key(catalogue.settings),
            done.json()["image"]["sha256"],
            int(time.time()) + 3600,
        )
        config = tmp_path / "schemathesis.toml"
        config.write_text(schemathesis_config(credential, image_token))
        report = tmp_path / "report.ndjson"
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": contract.__name__,
            "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
            contract.IMAGE_URL: f"{site.base}/xray.png",
            contract.IMPLANT_KEYS: json.dumps(implant_keys(catalogue)),
        }
        started = time.monotonic()
        run = subprocess.run(
            [
                *ST,
                "--config-file",
                str(config),
                "run",
                f"{base}/openapi.json",
                *("--no-color", "--report", "ndjson", "--report-ndjson-path", str(report)),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=900,
        )
        elapsed = time.monotonic() - started
        (tmp_path / "st-output.txt").write_text(run.stdout + run.stderr)  # the whole story
        summary = run.stdout[run.stdout.find("====") :] if "====" in run.stdout else run.stdout
        print(f"st run as {identity}: {elapsed:.0f} s\n{summary[-6000:]}")
        assert run.returncode == 0, summary[-12000:] + run.stderr[-3000:]
        assert f"Selected: {operations}/{operations}" in run.stdout
        assert f"Tested: {operations}" in run.stdout
        # The hooks did their work: valid requests reached the server's success paths.
        answered = statuses(report)
        for operation, status in [
            ("POST /v1/upload", 200),  # a real image
            ("POST /v1/webhook", 202),
            ("POST /v1/analyses/{analysis_id}/feedback", 201),  # a catalogue implant
            ("GET /v1/images/{token}", 200),  # the signed link
            ("GET /v1/metrics", 200),  # the operator token
            ("DELETE /v1/analyses/{analysis_id}", 204),  # the stateful phase's own ids
        ]:
            assert status in answered.get(operation, set()), (operation, answered.get(operation))
        assert 429 not in set().union(*answered.values())
        assert httpx.get(f"{base}/v1/healthcheck").status_code == 200


def statuses(report: Path) -> dict[str, set[int]]:
    """The statuses each operation answered in the run, from its NDJSON report."""
    seen: dict[str, set[int]] = {}
    for line in report.read_text().splitlines():
        event = json.loads(line)
        recorder = event.get("ScenarioFinished", {}).get("recorder", {})
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            if interaction.get("response"):
                operation = f"{case['method']} {case['path']}"
                seen.setdefault(operation, set()).add(interaction["response"]["status_code"])
    return seen


def wfc_users(clinic_keys: list[str]) -> dict[str, Any]:
    return {
        "schemaVersion": "1",
        "auth": [
            {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}]}
            for name, key in zip(("clinic-a", "clinic-b"), clinic_keys, strict=True)
        ],
    }


def implant_keys(cat: Catalogue) -> list[str]:
    with db.connect(cat.settings) as conn:
        rows = conn.execute("SELECT key FROM implants ORDER BY key").fetchall()
    return [row[0] for row in rows]


def test_old_paths_stay_as_aliases(catalogue: Catalogue, tiny_embedder: Any) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        old = httpx.post(
            f"{base}/upload", files={"file": ("q.png", catalogue.query_png)}, headers=AUTH
        )
        assert old.status_code == 200
        for prefix in ("", "/v1"):
            answer = httpx.get(f"{base}{prefix}/analyses/{old.json()['id']}", headers=AUTH)
            assert answer.status_code == 200 and answer.json()["id"] == old.json()["id"]
        accepted = httpx.post(
            f"{base}/v1/webhook", json={"image_url": "https://a.example/x.png"}, headers=AUTH
        ).json()
        assert accepted["url"].startswith(f"{base}/v1/analyses/")  # links say /v1
        missing = httpx.get(f"{base}/v1/analyses/nope", headers=AUTH)
        assert missing.status_code == 404
        assert missing.json()["error"] == {"code": "not_found", "message": "no such analysis"}
        bad = httpx.get(f"{base}/v1/implants", params={"limit": 0}, headers=AUTH)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "unprocessable"
        assert "limit" in bad.json()["error"]["message"]
        unauthorized = httpx.get(f"{base}/v1/implants")
        assert unauthorized.status_code == 401
        assert unauthorized.json()["error"]["code"] == "unauthorized"


@pytest.mark.skipif(
    shutil.which("openapi-python-client") is None
    and not (Path(sys.executable).parent / "openapi-python-client").exists(),
    reason="openapi-python-client is not installed (pip install -e '.[dev]')",
)
def test_a_generated_client_submits_and_reads(
    catalogue: Catalogue, tiny_embedder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = shutil.which("openapi-python-client") or str(
        Path(sys.executable).parent / "openapi-python-client"
    )
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        spec = tmp_path / "openapi.json"
        spec.write_text(httpx.get(f"{base}/openapi.json").text)
        done = subprocess.run(
            [generator, "generate", "--path", str(spec), "--output-path", str(tmp_path / "gen")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            # its post-generation hook runs ruff, installed beside it
            env={**os.environ, "PATH": f"{Path(generator).parent}{os.pathsep}{os.environ['PATH']}"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        monkeypatch.syspath_prepend(str(tmp_path / "gen"))
        package = next(p.name for p in (tmp_path / "gen").iterdir() if (p / "client.py").exists())
        client_module = importlib.import_module(f"{package}.client")
        upload = importlib.import_module(f"{package}.api.default.upload")
        read = importlib.import_module(f"{package}.api.default.get_analysis")
        models = importlib.import_module(f"{package}.models")
        types = importlib.import_module(f"{package}.types")

        client = client_module.AuthenticatedClient(base_url=base, token=TOKEN)
        body = models.UploadBody(file=types.File(payload=catalogue.query_png, file_name="q.png"))
        result = upload.sync(client=client, body=body)
        assert result.status == "done" and len(result.matches) == 3
        again = read.sync(client=client, analysis_id=result.id)
        assert again.id == result.id and again.matches[0].key == result.matches[0].key
        assert poll(f"{base}/v1/analyses/{result.id}", headers=AUTH)["status"] == "done"
