"""What a dentist runs into on the pages (issue 22, items 6-15), in a real headless
Chromium, in pt-BR on a 360 px phone and in English on a desktop. Screenshots land
in tests/output/pages/ (RAIOX_TEST_OUTPUT to put them elsewhere)."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from raiox_cli import db
from raiox_cli.clinics import keys, links
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, running

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SECRET_KEY = "dentist-pages-secret-" + uuid.uuid4().hex
MAX_BYTES = 60_000  # the test's RAIOX_SERVER_MAX_BYTES: an upload over it is refused
OUTPUT = Path(os.environ.get("RAIOX_TEST_OUTPUT", Path(__file__).parents[1] / "output")) / "pages"
ENGLISH_CONNECTIONS = {"internal hex", "external hex", "conical", "tri-channel"}

WORDS = {
    "en": {
        "too_large": "This image is too large",
        "empty": "This file is empty",
        "no_page": "There is nothing at this address",
        "gone": "sign in on the start page with your clinic's key",
        "banner": "Test model: these results mean nothing",
        "confirmed": "Confirmed",
        "by": "by Clinica Sorriso",
    },
    "pt-BR": {
        "too_large": "Esta imagem é grande demais",
        "empty": "Este arquivo está vazio",
        "no_page": "Não há nada neste endereço",
        "gone": "entre na página inicial com a chave da sua clínica",
        "banner": "Modelo de teste: estes resultados não têm valor",
        "confirmed": "Confirmado",
        "by": "por Clinica Sorriso",
    },
}


def _shot(page: Any, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


def _no_horizontal_scroll(page: Any) -> None:
    overflow = page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"page scrolls sideways by {overflow}px"


def _sign_in(page: Any, base: str, key: str) -> None:
    page.goto(base + "/")
    page.fill("#key", key)
    page.click("form[action='/signin'] button")
    page.wait_for_selector("#upload-form")


def _upload(page: Any, name: str, data: bytes) -> None:
    page.set_input_files("#file", {"name": name, "mimeType": "image/png", "buffer": data})
    page.click("#upload-form button[type=submit]")
    page.wait_for_load_state()


@pytest.mark.parametrize(
    ("lang", "width"), [("pt-BR", 360), ("en", 1280)], ids=["pt-BR-360", "en-1280"]
)
def test_a_dentist_on_the_pages(
    catalogue: Catalogue, tiny_embedder: Any, browser: Any, lang: str, width: int
) -> None:
    words, tag = WORDS[lang], f"{lang}-{width}"
    with db.connect(catalogue.settings) as conn:
        _, key = keys.add(conn, "Clinica Sorriso")
    big = catalogue.query_png + os.urandom(MAX_BYTES)  # a PNG with trailing bytes, too big
    with running(
        catalogue,
        tiny_embedder,
        webhook_token=TOKEN,
        secret_key=SECRET_KEY,
        server_max_bytes=MAX_BYTES,
    ) as base:
        settings = catalogue.settings.replace(secret_key=SECRET_KEY, public_url=base)
        context = browser.new_context(
            locale=lang,
            extra_http_headers={"accept-language": lang},
            viewport={"width": width, "height": 800},
        )
        page = context.new_page()
        _sign_in(page, base, key)

        # 9: an empty file says it is empty, not "choose a file".
        _upload(page, "empty.png", b"")
        assert words["empty"] in page.locator("#upload-error").inner_text()
        _shot(page, f"09-empty-file-{tag}")
        # 6: an oversized upload is the translated page, not raw JSON.
        _upload(page, "big.png", big)
        assert words["too_large"] in page.locator("#upload-error").inner_text()
        assert '"error"' not in page.content()
        _shot(page, f"06-too-large-{tag}")

        # 8: the crop fields are there without JavaScript.
        plain = browser.new_context(
            java_script_enabled=False,
            extra_http_headers={"accept-language": lang},
            viewport={"width": width, "height": 800},
        )
        nojs = plain.new_page()
        _sign_in(nojs, base, key)
        assert nojs.locator("#crop_x").is_visible()
        for name, value in (("x", "10"), ("y", "10"), ("w", "80"), ("h", "80")):
            nojs.fill(f"#crop_{name}", value)
        nojs.set_input_files(
            "#file", {"name": "q.png", "mimeType": "image/png", "buffer": catalogue.query_png}
        )
        _shot(nojs, f"08-crop-without-javascript-{tag}")
        nojs.click("#upload-form button[type=submit]")
        nojs.wait_for_url(re.compile(r".*/r/[A-Za-z0-9_-]{50}$"))
        cropped = links.verify(links.link_key(settings), nojs.url.rsplit("/", 1)[1])
        deadline = time.monotonic() + 60
        while "verdict" not in nojs.content():
            assert time.monotonic() < deadline
            time.sleep(0.5)
            nojs.reload()
        analysis = httpx.get(
            f"{base}/v1/analyses/{cropped}", headers={"authorization": f"Bearer {TOKEN}"}
        ).json()
        assert analysis["crop"] and analysis["crop"][2] > 0  # the typed box was searched
        plain.close()

        # 10: random weights (the test model): a banner, and no coloured verdict.
        result = browser.new_context(  # the result link alone: no clinic signed in
            extra_http_headers={"accept-language": lang}, viewport={"width": width, "height": 800}
        ).new_page()
        result.goto(base + links.result_path(settings, cropped))
        assert words["banner"] in result.locator("#meaningless").inner_text()
        assert "verdict-" not in (result.locator("#verdict").get_attribute("class") or "")
        assert result.locator(".score-ok, .score-low").count() == 0
        # 15: the connection is in the page's language.
        connections = {
            dd.inner_text()
            for dd in result.locator(".match dl dd:nth-of-type(4)").all()
            if dd.inner_text()
        }
        assert connections
        if lang == "pt-BR":
            assert not connections & ENGLISH_CONNECTIONS, connections
        _shot(result, f"10-15-random-weights-{tag}")
        # 12: confirmed through the link: the analysis's clinic, the card marked.
        result.click("#match-2 form button")
        result.wait_for_selector("#recorded")
        assert words["by"] in result.locator("#recorded").inner_text()
        assert words["confirmed"] in result.locator("#match-2 .badge").inner_text()
        assert result.locator(".match.confirmed").count() == 1
        _shot(result, f"12-confirmed-card-{tag}")
        result.fill("#note", "Neodent Helix GM 3.5x10")
        result.click("form:has(#note) button")
        result.wait_for_selector("#recorded")
        confirmation = httpx.get(
            f"{base}/v1/analyses/{cropped}", headers={"authorization": f"Bearer {TOKEN}"}
        ).json()["confirmation"]
        assert confirmation["not_in_catalogue"] and confirmation["note"].startswith("Neodent")
        assert confirmation["client_id"] == "Clinica Sorriso"
        _shot(result, f"12-not-in-catalogue-note-{tag}")

        # 7: the recent list shows names, as cards that fit a phone.
        page.goto(base + "/")
        items = page.locator("#history .history-item")
        assert items.count() >= 1 and page.locator("table").count() == 0
        tops = [t.inner_text() for t in page.locator("#history .history-top").all()]
        assert tops and not any("/" in top for top in tops), tops  # names, never keys
        _no_horizontal_scroll(page)
        _shot(page, f"07-history-{tag}")

        # 13: an expired link says how to open the result again.
        expired = links.make(links.link_key(settings), cropped, -60)
        answer = result.goto(f"{base}/r/{expired}")
        assert answer.status == 410 and words["gone"] in result.content()
        _shot(result, f"13-expired-link-{tag}")
        # 14: an unknown path is the not-found page; the pages carry a favicon.
        answer = result.goto(f"{base}/no/such/page")
        assert answer.status == 404 and words["no_page"] in result.content()
        assert result.locator("link[rel=icon]").get_attribute("href") == "/favicon.ico"
        assert httpx.get(base + "/favicon.ico").status_code == 200
        _no_horizontal_scroll(result)
        _shot(result, f"14-not-found-{tag}")
        context.close()
