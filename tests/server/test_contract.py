"""The OpenAPI schema tells the truth: schemathesis generates requests for every
operation from /openapi.json and checks the real server's answers against it (no
server errors, only declared status codes, bodies that match the declared models),
and a client generated from the same schema by openapi-python-client submits an
X-ray and reads the analysis."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, poll, running

pytestmark = pytest.mark.slow

AUTH = {"authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 12  # bounded: the run stays around a minute on 2 cores


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


def test_schema_documents_every_answer_and_contract_holds(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        # Something to find: one analysis done, so reads and feedback reach real rows.
        done = httpx.post(
            f"{base}/v1/upload", files={"file": ("q.png", catalogue.query_png)}, headers=AUTH
        )
        assert done.status_code == 200, done.text
        document = httpx.get(f"{base}/openapi.json").json()
        assert no_empty_schemas(document) == []
        assert all(path.startswith("/v1/") for path in document["paths"])
        assert document["paths"]["/v1/healthcheck"]["get"]["security"] == []
        assert "bearer" in document["components"]["securitySchemes"]

        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == sum(len(ops) for ops in document["paths"].values())
        for operation in operations:

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy())
            def check(case: Any) -> None:
                case.call_and_validate(base_url=base, headers=AUTH, checks=CHECKS, timeout=30)

            check()
        assert httpx.get(f"{base}/v1/healthcheck").status_code == 200


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
