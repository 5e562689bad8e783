"""The webhook server over real HTTP: uvicorn on a loopback port, the embedded
PostgreSQL, moto's S3 server, test images served by a local HTTP server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from raiox_cli import config, db
from raiox_cli.cli import app as cli_app
from raiox_cli.db import queries
from raiox_cli.server import auth
from raiox_cli.store import objects as storage
from raiox_cli.training import synth
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import (
    FORM_ID,
    SECRET,
    TOKEN,
    Site,
    count_analyses,
    jotform_fields,
    poll,
    running,
    signed,
)


def test_jotform_and_json_deliveries_complete_once_and_notify(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, capsys: pytest.CaptureFixture
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    image_url = site.base + "/xray.png"
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        webhook_secret=SECRET,
        notify_url=site.base + "/notify",
        download_allow_loopback=True,
        jotform_form_ids=f"{FORM_ID},999",
        jotform_client_field="clinicId",
    ) as base:
        submission = "5712345678901234567"
        first = httpx.post(
            f"{base}/webhook?token={TOKEN}", files=jotform_fields(image_url, submission)
        )
        assert first.status_code == 202, first.text
        jot = first.json()
        assert jot["url"] == f"{base}/v1/analyses/{jot['id']}" and not jot["replayed"]
        again = httpx.post(
            f"{base}/webhook?token={TOKEN}", files=jotform_fields(image_url, submission)
        )
        assert again.json()["id"] == jot["id"] and again.json()["replayed"]

        body = {"image_url": image_url, "client_id": "c-7", "metadata": {"tooth": 36}}
        msg_id = "msg_" + uuid.uuid4().hex
        sent = httpx.post(
            f"{base}/webhook", params={"token": TOKEN}, **signed(body, msg_id), timeout=30
        )
        assert sent.status_code in (200, 202), sent.text
        api = sent.json()
        # A retry of the same delivery is signed again, with a new timestamp.
        replay = httpx.post(
            f"{base}/webhook",
            params={"token": TOKEN, "wait": 20},
            **signed(body, msg_id),
            timeout=30,
        )
        assert replay.json()["id"] == api["id"] and replay.json()["replayed"]
        assert replay.json()["status"] == "done"  # ?wait returned the result inline

        headers = {"authorization": f"Bearer {TOKEN}"}
        for analysis_id in (jot["id"], api["id"]):
            result = poll(f"{base}/analyses/{analysis_id}", headers=headers)
            assert result["status"] == "done", result
            assert len(result["matches"]) == 3
            assert [m["rank"] for m in result["matches"]] == [1, 2, 3]
            assert {m["implant_id"] for m in result["matches"]} <= set(catalogue.implant_ids)
            link = result["image"]["url"]
            assert "X-Amz-Signature" in link  # presigned, never a public object
            assert httpx.get(link).content == catalogue.query_png
            assert "X-Amz-Signature" in result["matches"][0]["image_url"]
        jot_result = httpx.get(f"{base}/analyses/{jot['id']}", headers=headers).json()
        assert jot_result["client_id"] == "clinic-42"
        assert jot_result["metadata"]["jotform"]["submission_id"] == submission
        api_result = httpx.get(f"{base}/analyses/{api['id']}", headers=headers).json()
        assert api_result["client_id"] == "c-7" and api_result["metadata"] == {"tooth": 36}

        deadline = time.monotonic() + 15
        while len(site.notifications) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        delivered = {}
        for note_headers, note_body in site.notifications:
            assert auth.verify_signature(SECRET, note_headers, note_body).startswith("msg_")
            payload = json.loads(note_body)
            assert payload["type"] == "analysis.completed"
            delivered[payload["data"]["id"]] = payload["data"]
        assert set(delivered) == {jot["id"], api["id"]}
        assert len(delivered[api["id"]]["matches"]) == 3
        final = poll(f"{base}/analyses/{api['id']}", headers=headers)
        deadline = time.monotonic() + 5
        while final.get("notifications", {}).get("webhook", {}).get("status") != "sent":
            assert time.monotonic() < deadline, final
            final = httpx.get(f"{base}/analyses/{api['id']}", headers=headers).json()
    assert count_analyses(catalogue.settings) == 2
    assert site.hits.count("/xray.png") == 2
    logged = capsys.readouterr().err
    assert f'"analysis_id": "{jot["id"]}"' in logged and '"event": "job done"' in logged
    assert TOKEN not in logged


def test_authentication_refusals(catalogue: Catalogue, tiny_embedder: Any, site: Site) -> None:
    body = {"image_url": site.base + "/xray.png"}
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        webhook_secret=SECRET,
        jotform_form_ids=FORM_ID,
    ) as base:
        hook = f"{base}/webhook"
        ok_token = {"token": TOKEN}
        cases = [
            httpx.post(hook, **signed(body)),  # no token
            httpx.post(hook, params={"token": "wrong"}, **signed(body)),
            httpx.post(hook, params=ok_token, json=body),  # no signature
            httpx.post(
                hook,
                params=ok_token,
                content=json.dumps(body).encode(),
                headers={
                    **signed(body)["headers"],
                    "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode(),
                },
            ),
            httpx.post(hook, params=ok_token, **signed(body, timestamp=int(time.time()) - 600)),
            httpx.post(hook, files=jotform_fields(body["image_url"], "1")),  # Jotform, no token
            httpx.get(f"{base}/analyses/1"),
            httpx.get(f"{base}/implants", headers={"authorization": "Bearer nope"}),
        ]
        assert [r.status_code for r in cases] == [401] * len(cases)
        other_form = httpx.post(
            f"{hook}?token={TOKEN}", files=jotform_fields(body["image_url"], "2", form_id="777")
        )
        assert other_form.status_code == 403
        assert httpx.post(hook, params=ok_token, **signed({"image_url": 5})).status_code == 400
        assert httpx.get(f"{base}/healthcheck").status_code == 200
        assert httpx.get(f"{base}/docs").status_code == 200
        assert "/v1/webhook" in httpx.get(f"{base}/openapi.json").json()["paths"]
    assert count_analyses(catalogue.settings) == 0
    assert site.hits == []


def test_refuses_to_start_without_authentication(raiox_env: config.Settings) -> None:
    result = CliRunner().invoke(cli_app, ["serve-webhook-minimal", "--port", "1"])
    assert result.exit_code == 2
    assert "RAIOX_WEBHOOK_TOKEN" in result.output and "--insecure-no-auth" in result.output


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/xray.png",
        "http://10.20.30.40/xray.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:{port}/xray.png",
    ],
)
def test_ssrf_targets_fail_without_a_request(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, target: str
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {})
    url = target.format(port=site.base.rsplit(":", 1)[1])
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        answer = httpx.post(
            f"{base}/webhook",
            params={"token": TOKEN, "wait": 20},
            json={"image_url": url},
            timeout=30,
        ).json()
    assert answer["status"] == "failed"
    assert "SSRF" in answer["error"] and answer["attempts"] == 1
    assert site.hits == []


def test_bad_downloads_fail_and_transient_ones_retry(
    catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:
    site.routes["/xray.png"] = (200, catalogue.query_png, {})
    site.routes["/big.png"] = (200, b"\x89PNG\r\n\x1a\n" + b"0" * 200_000, {})
    site.routes["/notes.txt"] = (200, b"just some text", {"Content-Type": "text/plain"})
    site.routes["/to-private"] = (302, b"", {"Location": "http://10.0.0.8/xray.png"})
    site.routes["/flaky.png"] = site.routes["/xray.png"]
    site.failures["/flaky.png"] = 2
    expected = {
        "/big.png": "200000-byte cap" if False else "byte cap",
        "/notes.txt": "not a usable image",
        "/to-private": "SSRF",
        "/missing.png": "HTTP 404",
    }
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        download_allow_loopback=True,
        server_max_bytes=100_000,
    ) as base:
        post = {"params": {"token": TOKEN}, "timeout": 30}
        ids = {
            path: httpx.post(
                f"{base}/webhook", json={"image_url": site.base + path}, **post
            ).json()["id"]
            for path in [*expected, "/flaky.png"]
        }
        headers = {"x-raiox-token": TOKEN}
        for path, reason in expected.items():
            result = poll(f"{base}/analyses/{ids[path]}", headers=headers)
            assert result["status"] == "failed" and reason in result["error"], (path, result)
            assert result["attempts"] == 1  # permanent: no retries
        flaky = poll(f"{base}/analyses/{ids['/flaky.png']}", headers=headers)
        assert flaky["status"] == "done" and flaky["attempts"] == 3, flaky
        too_big = httpx.post(
            f"{base}/webhook",
            content=b"{" + b" " * 100_001 + b"}",
            **post,
            headers={"content-type": "application/json"},
        )
        assert too_big.status_code == 413
    assert site.hits.count("/flaky.png") == 3


def test_upload_and_catalogue_browsing(catalogue: Catalogue, tiny_embedder: Any) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        auth_header = {"authorization": f"Bearer {TOKEN}"}
        answer = httpx.post(
            f"{base}/upload?k=2",
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            headers=auth_header,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["status"] == "done" and result["source"] == "upload"
        assert len(result["matches"]) == 2 and "confident" in result
        stored = httpx.get(f"{base}/analyses/{result['id']}", headers=auth_header).json()

        def unsigned(matches: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # A presigned link carries its signing second (X-Amz-Date): two answers
            # a second apart differ there, not in what they point at.
            return [{**m, "image_url": m["image_url"].split("?")[0]} for m in matches]

        assert unsigned(stored["matches"]) == unsigned(result["matches"])
        not_image = httpx.post(
            f"{base}/upload",
            files={"file": ("x.png", b"not an image", "image/png")},
            headers=auth_header,
        )
        assert not_image.status_code == 422

        page = httpx.get(f"{base}/implants?skip=1&limit=2", headers=auth_header).json()
        assert page["total"] == 4 and [i["id"] for i in page["items"]] == catalogue.implant_ids[1:3]
        one = httpx.get(f"{base}/implants/{catalogue.implant_ids[0]}", headers=auth_header).json()
        assert len(one["images"]) == 2 and "X-Amz-Signature" in one["images"][0]["url"]
        assert httpx.get(f"{base}/implants/999999", headers=auth_header).status_code == 404
        assert httpx.get(f"{base}/analyses/999999", headers=auth_header).status_code == 404
        assert httpx.get(f"{base}/implants?limit=1000", headers=auth_header).status_code == 422
        health = httpx.get(f"{base}/healthcheck").json()
        assert health["database"] and health["model_id"] == tiny_embedder.model_id
        assert health["pending"] == 0


def test_healthcheck_is_503_when_the_database_is_gone(
    pg_server_url: str, tmp_path: Path, tiny_embedder: Any
) -> None:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base_url, _, query = pg_server_url.partition("?")
    settings = config.resolve(
        env={
            "RAIOX_HOME": str(tmp_path),
            "RAIOX_DATABASE_URL": f"{base_url.rsplit('/', 1)[0]}/{name}?{query}",
        }
    )
    db.migrate(settings)
    cat = Catalogue(settings, storage.open_store(settings), b"", [])
    with running(cat, tiny_embedder, insecure_no_auth=True) as base:
        assert httpx.get(f"{base}/healthcheck").status_code == 200
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        down = httpx.get(f"{base}/healthcheck", timeout=30)
        assert down.status_code == 503 and down.json()["database"] is False


def test_graceful_shutdown_gives_running_jobs_back(
    catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:
    site.routes["/slow.png"] = (200, catalogue.query_png, {})
    site.delays["/slow.png"] = 4.0
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        download_allow_loopback=True,
        shutdown_grace_s=0.3,
    ) as base:
        answer = httpx.post(
            f"{base}/webhook", params={"token": TOKEN}, json={"image_url": site.base + "/slow.png"}
        ).json()
        deadline = time.monotonic() + 10
        while "/slow.png" not in site.hits:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with db.connect(catalogue.settings) as conn:
        row = queries.find_analysis(conn, uuid.UUID(answer["id"]), clinic_id=None)
    assert row is not None
    assert (row["status"], row["attempts"], row["locked_until"]) == ("pending", 0, None)


@pytest.mark.slow
def test_killed_server_resumes_its_job_after_restart(
    catalogue: Catalogue, site: Site, tmp_path: Path
) -> None:
    site.routes["/slow.png"] = (200, catalogue.query_png, {})
    site.delays["/slow.png"] = 4.0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "RAIOX_WEBHOOK_TOKEN": TOKEN,
        "RAIOX_DOWNLOAD_ALLOW_LOOPBACK": "1",
        "RAIOX_JOB_LEASE_S": "2",
    }
    command = [sys.executable, "-m", "raiox_cli", "serve-webhook-minimal", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        log = (tmp_path / "server.log").open("ab")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthcheck").status_code == 200:
                    return proc
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    proc = start()
    try:
        answer = httpx.post(
            f"{base}/webhook", params={"token": TOKEN}, json={"image_url": site.base + "/slow.png"}
        ).json()
        deadline = time.monotonic() + 20
        while "/slow.png" not in site.hits:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-download: no chance to clean up
        proc.wait(10)
        with db.connect(catalogue.settings) as conn:
            row = queries.find_analysis(conn, uuid.UUID(answer["id"]), clinic_id=None)
        assert row is not None and (row["status"], row["attempts"]) == ("running", 1)
        proc = start()
        result = poll(
            f"{base}/analyses/{answer['id']}", headers={"x-raiox-token": TOKEN}, timeout=40
        )
        assert result["status"] == "done" and result["attempts"] == 2, result
        assert len(result["matches"]) == 3
        assert count_analyses(catalogue.settings) == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_batched_worker_matches_single_jobs_and_fails_per_job(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs claimed together and embedded in one forward pass get the matches they get
    one at a time; a bad download fails alone and a flaky one retries alone."""
    from raiox_cli.server import worker as worker_module

    designs = synth.design_systems(4)
    for n, design in enumerate(designs):
        picture = synth.render_view(design, seed=100 + n, query=True, size=(96, 120))
        site.routes[f"/q{n}.png"] = (200, synth.png_bytes(picture), {})
    site.routes["/notes.txt"] = (200, b"just some text", {"Content-Type": "text/plain"})
    site.routes["/flaky.png"] = site.routes["/q0.png"]
    paths = [f"/q{n}.png" for n in range(len(designs))] + ["/notes.txt", "/flaky.png"]
    claimed: list[int] = []
    real_claim = queries.claim_due_jobs

    def watched(conn: Any, **kw: Any) -> list[dict[str, Any]]:
        jobs = real_claim(conn, **kw)
        if jobs:
            claimed.append(len(jobs))
        return jobs

    monkeypatch.setattr(worker_module.queries, "claim_due_jobs", watched)
    outcome: dict[int, dict[str, Any]] = {}
    for batch in (1, 8):
        site.failures["/flaky.png"] = 2
        with db.connect(catalogue.settings) as conn:  # all due before the worker starts
            ids = [
                queries.get_analysis(
                    conn,
                    queries.create_analysis(conn, source="webhook", image_url=site.base + path)[0],
                )["public_id"]
                for path in paths
            ]
            conn.commit()
        with running(
            catalogue, tiny_embedder, webhook_token=TOKEN, download_allow_loopback=True, batch=batch
        ) as base:
            headers = {"x-raiox-token": TOKEN}
            outcome[batch] = {
                path: poll(f"{base}/analyses/{analysis_id}", headers=headers)
                for path, analysis_id in zip(paths, ids, strict=True)
            }
    assert claimed and max(claimed) == len(paths)  # batch 8 took every due job at once
    for batch, results in outcome.items():
        assert results["/notes.txt"]["status"] == "failed", batch
        assert "not a usable image" in results["/notes.txt"]["error"]
        assert results["/notes.txt"]["attempts"] == 1
        flaky = results["/flaky.png"]
        assert flaky["status"] == "done" and flaky["attempts"] == 3, (batch, flaky)
    for path in paths:
        if path == "/notes.txt":
            continue
        one, many = outcome[1][path], outcome[8][path]
        assert many["status"] == one["status"] == "done"
        assert [m["implant_id"] for m in many["matches"]] == [
            m["implant_id"] for m in one["matches"]
        ]
        for a, b in zip(many["matches"], one["matches"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_server_follows_the_tta_setting(
    catalogue: Catalogue, tiny_embedder: Any, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAIOX_TTA reaches every server path like the CLI's: with it off a job costs
    one image in the forward pass (both worker paths and /upload), with it on three."""
    from raiox_cli.embedding import base

    site.routes["/q.png"] = (200, catalogue.query_png, {})
    passes: list[int] = []
    monkeypatch.setattr(base, "forward_observers", [lambda n, _s: passes.append(n)])
    images_per_job = {}
    for tta in (False, True):
        for batch in (1, 8):
            passes.clear()
            with db.connect(catalogue.settings) as conn:  # both due before the worker starts
                ids = [
                    queries.get_analysis(
                        conn,
                        queries.create_analysis(
                            conn, source="webhook", image_url=f"{site.base}/q.png"
                        )[0],
                    )["public_id"]
                    for _ in range(2)
                ]
                conn.commit()
            with running(
                catalogue,
                tiny_embedder,
                webhook_token=TOKEN,
                download_allow_loopback=True,
                batch=batch,
                tta=tta,
            ) as base:
                headers = {"x-raiox-token": TOKEN}
                for analysis_id in ids:
                    assert poll(f"{base}/analyses/{analysis_id}", headers=headers)["status"] == (
                        "done"
                    )
                worker_images = sum(passes)
                answer = httpx.post(
                    f"{base}/upload",
                    files={"file": ("q.png", catalogue.query_png, "image/png")},
                    headers=headers,
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
            images_per_job[tta, batch] = (worker_images / len(ids), sum(passes) - worker_images)
    assert images_per_job == {
        (False, 1): (1, 1),
        (False, 8): (1, 1),
        (True, 1): (3, 3),
        (True, 8): (3, 3),
    }
