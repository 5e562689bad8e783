"""A clinic's time zone (issue 22 item 11): `raiox clinics add/update --timezone`
(IANA names, checked), RAIOX_TIMEZONE as the default; pages show times in it, the
API stays UTC."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import httpx
from typer.testing import CliRunner

from raiox_cli import config
from raiox_cli.cli import app as cli_app
from raiox_cli.server import i18n, notify
from raiox_cli.server.routes import pages
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, running

runner = CliRunner()


def test_clinic_time_zone_from_the_cli(migrated: config.Settings) -> None:
    refused = runner.invoke(cli_app, ["clinics", "add", "x", "--timezone", "Mars/Olympus"])
    assert refused.exit_code == 2, refused.output
    assert "not an IANA time zone" in refused.output
    added = runner.invoke(
        cli_app, ["clinics", "add", "sorriso", "--timezone", "America/Sao_Paulo", "--json"]
    )
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["timezone"] == "America/Sao_Paulo"
    moved = runner.invoke(
        cli_app, ["clinics", "update", "sorriso", "--timezone", "Europe/Lisbon", "--json"]
    )
    assert moved.exit_code == 0 and json.loads(moved.stdout)["timezone"] == "Europe/Lisbon"
    missing = runner.invoke(cli_app, ["clinics", "update", "nobody", "--timezone", "UTC"])
    assert missing.exit_code != 0 and "nobody" in missing.output


def test_times_in_the_clinics_zone() -> None:
    moment = dt.datetime(2026, 12, 6, 1, 18, tzinfo=dt.timezone.utc)
    assert i18n.Translator("pt-BR").when(moment) == "06/12/2026 01:18 UTC"
    saopaulo = i18n.Translator("pt-BR", "America/Sao_Paulo").when(moment)
    assert saopaulo == "05/12/2026 22:18 UTC-03:00"
    assert i18n.Translator("en", "Europe/Lisbon").when(moment) == "2026-12-06 01:18 WET"


def test_pages_show_the_clinics_zone_and_the_api_utc(
    catalogue: Catalogue, tiny_embedder: Any
) -> None:
    added = runner.invoke(
        cli_app, ["clinics", "add", "sorriso", "--timezone", "America/Sao_Paulo", "--json"]
    )
    key = json.loads(added.stdout)["key"]
    with running(catalogue, tiny_embedder, webhook_token=TOKEN, timezone="Europe/Lisbon") as base:
        first = httpx.get(base + "/")
        csrf = first.cookies[pages.CSRF_COOKIE]
        cookies = {pages.CSRF_COOKIE: csrf, pages.KEY_COOKIE: key}
        sent = httpx.post(
            base + "/submit",
            data={"csrf": csrf},
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            cookies=cookies,
        )
        assert sent.status_code == 303, sent.text
        result = httpx.get(base + sent.headers["location"], headers={"accept-language": "pt-BR"})
        assert "UTC-03:00" in result.text or "UTC-02:00" in result.text
        home = httpx.get(base + "/", cookies=cookies, headers={"accept-language": "pt-BR"})
        assert "UTC-03:00" in home.text or "UTC-02:00" in home.text
        listed = httpx.get(f"{base}/v1/analyses", headers={"authorization": f"Bearer {TOKEN}"})
        assert listed.json()["items"][0]["created_at"].endswith("+00:00")


def test_emails_say_times_in_the_clinics_zone() -> None:
    created = dt.datetime(2026, 12, 6, 1, 18, tzinfo=dt.timezone.utc)
    view = {
        "id": "6f1c2a4e-3b5d-4c8e-9a0b-1d2e3f405162",
        "status": "done",
        "created_at": created,
        "matches": [],
        "result_url": "https://raiox.example/r/x",
        "confidence": "none",
    }
    expires = created + dt.timedelta(days=7)
    _, text, html = notify.render_email(
        notify.Finished(view, "pt-BR", expires, "America/Sao_Paulo")
    )
    assert "05/12/2026 22:18 UTC-03:00" in text and "12/12/2026 22:18 UTC-03:00" in text
    assert "22:18 UTC-03:00" in html and "01:18 UTC" not in text
    _, plain, _ = notify.render_email(notify.Finished(view, "en", expires))
    assert "2026-12-06 01:18 UTC" in plain  # no zone set: the server's default, UTC
