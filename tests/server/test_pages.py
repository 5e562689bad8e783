"""The pages in a real browser: headless Chromium (Debian's package) driven by
Playwright, against the real server on loopback with the embedded PostgreSQL and
moto's S3. Screenshots of every page land in the test's temporary folder."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from raiox_cli import db
from raiox_cli.clinics import keys as clients
from raiox_cli.clinics import links
from raiox_cli.server.routes import pages
from tests.helpers.catalogue import Catalogue
from tests.helpers.mail import Mailbox
from tests.helpers.server import TOKEN, Site, running

SECRET_KEY = "pages-test-secret-" + uuid.uuid4().hex  # signs the result links


def _clinic(cat: Catalogue, name: str, email: str | None = None) -> str:
    with db.connect(cat.settings) as conn:
        _, key = clients.add(conn, name, email=email)
    return key


def _server(cat: Catalogue, embedder: Any, **changes: Any) -> Any:
    return running(
        cat,
        embedder,
        webhook_token=TOKEN,
        secret_key=SECRET_KEY,
        **changes,
    )


def _shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _no_horizontal_scroll(page: Any) -> None:
    overflow = page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"page scrolls sideways by {overflow}px"


def _images_loaded(page: Any, selector: str) -> list[int]:
    page.wait_for_function(
        f"() => [...document.querySelectorAll({selector!r})].every(i => i.complete)"
    )
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")


def _wait_done(page: Any, timeout_s: float = 60) -> None:
    """The pending page refreshes itself; wait until the verdict is there."""
    page.wait_for_selector("#verdict", timeout=timeout_s * 1000)


def test_upload_result_and_confirm_in_a_browser(
    catalogue: Catalogue,
    tiny_embedder: Any,
    browser: Any,
    tmp_path: Path,
) -> None:
    key = _clinic(catalogue, "Sorriso SP")
    query = tmp_path / "query.png"
    query.write_bytes(catalogue.query_png)
    with _server(catalogue, tiny_embedder) as base:
        context = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 900})
        page = context.new_page()
        hosts: set[str] = set()  # every request the pages make: none may leave this server
        page.on(
            "request",
            lambda r: hosts.add(urlsplit(r.url).netloc) if r.url.startswith("http") else None,
        )
        answer = page.goto(base + "/")
        assert answer.status == 200 and page.locator("h1").inner_text() == "Sign in"
        _shot(page, tmp_path, "1-signin-en")

        page.fill("#key", "rxk_" + "x" * 43)
        page.click("button[type=submit]")
        assert "This key is not valid" in page.locator(".alert").inner_text()

        page.fill("#key", key)
        page.click("form[action='/signin'] button")
        page.wait_for_url(base + "/")
        assert page.locator("h1").inner_text() == "Identify an implant"
        cookie = next(c for c in context.cookies() if c["name"] == pages.KEY_COOKIE)
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
        assert key not in page.url and key not in page.content()

        page.set_input_files("#file", str(query))
        page.wait_for_selector("#preview", state="visible")
        box = page.locator("#preview").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.1)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.95, steps=5)
        page.mouse.up()
        assert float(page.input_value("#crop_w")) == pytest.approx(70, abs=2)
        _shot(page, tmp_path, "2-upload-crop-en")
        page.click("#upload-form button[type=submit]")
        page.wait_for_url(re.compile(r".*/r/[A-Za-z0-9_-]{50}$"))
        result_url = page.url
        if page.locator(".spinner").count():
            _shot(page, tmp_path, "3-pending-en")
        _wait_done(page)

        assert page.locator(".match").count() == 3
        assert all(w > 0 for w in _images_loaded(page, "img.reference"))
        assert _images_loaded(page, ".query img")[0] > 0
        assert "red box" in page.locator(".query img").get_attribute("alt")
        verdict = page.locator("#verdict").text_content()
        assert verdict.startswith("Confidence: ")  # read out by screen readers, not shown
        assert verdict.split(": ", 2)[1] in ("Strong match", "Possible match", "No confident match")
        assert "not a diagnosis" in page.locator(".notice").inner_text()
        assert "raiox-tiny" in page.locator(".meta").inner_text()
        _shot(page, tmp_path, "4-result-en")

        first = page.locator("#match-1 h3").inner_text().split(" ", 1)[1]
        page.click("#match-1 form button")
        page.wait_for_selector("#recorded")
        assert first in page.locator("#recorded").inner_text()
        page.reload()
        recorded = page.locator("#recorded").inner_text()
        assert first in recorded and "ranked it #1" in recorded and "Sorriso SP" in recorded
        _shot(page, tmp_path, "5-confirmed-en")

        # Another implant, found by name in the catalogue.
        third = page.locator("#match-3 h3").inner_text().split(" ", 1)[1]
        page.fill("#q", third.split()[-1])
        page.click("form.search button")
        page.wait_for_selector("ul.found")
        page.locator("ul.found li", has_text=third).locator("button").click()
        page.wait_for_selector("#recorded")
        page.reload()
        assert third in page.locator("#recorded").inner_text()
        page.click("form:has(input[name=not_in_catalogue]) button")
        page.wait_for_selector("#recorded")
        page.reload()
        assert "not in the catalogue" in page.locator("#recorded").inner_text()

        assert hosts == {urlsplit(base).netloc}, hosts  # no CDN, font or script elsewhere
        # The keyboard reaches the page: the first Tab lands on "skip to content".
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        context.close()

        # A phone: 360 px wide, no sideways scrolling on any page.
        phone = browser.new_context(
            locale="en-US", viewport={"width": 360, "height": 740}, device_scale_factor=2
        )
        small = phone.new_page()
        small.goto(result_url)
        _wait_done(small)
        _no_horizontal_scroll(small)
        _shot(small, tmp_path, "6-result-phone-360")
        small.goto(base + "/")
        _no_horizontal_scroll(small)
        phone.close()

        # Portuguese when the browser asks for it, and the switch back to English.
        pt = browser.new_context(locale="pt-BR", viewport={"width": 1280, "height": 900})
        page = pt.new_page()
        page.goto(result_url)
        assert page.evaluate("document.documentElement.lang") == "pt-BR"
        assert page.locator("h1").inner_text() == "Identificação do implante"
        assert "não um diagnóstico" in page.locator(".notice").inner_text()
        assert "," in page.locator(".score").first.inner_text()  # 0,934
        assert "Registrado" in page.locator("#recorded").inner_text()
        _shot(page, tmp_path, "7-result-pt-BR")
        page.click("a[hreflang=en]")
        assert page.locator("h1").inner_text() == "Implant identification"
        page.goto(result_url)  # the choice is remembered
        assert page.locator("h1").inner_text() == "Implant identification"

        # A link that was tampered with: the not-found page, nothing about the analysis.
        token = result_url.rsplit("/", 1)[1]
        tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BA")
        answer = page.goto(f"{base}/r/{tampered}")
        assert answer.status == 404
        assert page.locator("h1").inner_text() == "Page not found"
        _shot(page, tmp_path, "8-not-found")
        pt.close()
    shots = sorted(p.name for p in tmp_path.glob("*.png") if p.name != "query.png")
    assert len(shots) >= 7, shots


def test_pending_page_refreshes_itself_and_expired_link(
    catalogue: Catalogue,
    tiny_embedder: Any,
    site: Site,
    browser: Any,
    tmp_path: Path,
) -> None:
    site.routes["/slow.png"] = (200, catalogue.query_png, {"Content-Type": "image/png"})
    site.delays["/slow.png"] = 4.0  # the download takes 4 s: the job is running meanwhile
    settings = catalogue.settings.replace(secret_key=SECRET_KEY)
    with _server(catalogue, tiny_embedder, download_allow_loopback=True) as base:
        accepted = httpx.post(
            f"{base}/webhook",
            params={"token": TOKEN},
            json={"image_url": site.base + "/slow.png"},
        ).json()
        path = links.result_path(settings, uuid.UUID(accepted["id"]))
        context = browser.new_context(locale="pt-BR")
        page = context.new_page()
        page.goto(base + path)
        assert page.locator("h1").inner_text() == "Analisando a radiografia…"
        assert page.locator("meta[http-equiv=refresh]").count() == 1
        _shot(page, tmp_path, "pending-pt-BR")
        _wait_done(page, timeout_s=30)  # no reload from here: the page did it
        assert page.locator(".match").count() == 3
        assert page.locator("meta[http-equiv=refresh]").count() == 0

        # A submission that is not an image: the reason in words, not the technical line.
        site.routes["/notes.txt"] = (200, b"just some text", {"Content-Type": "text/plain"})
        failed = httpx.post(
            f"{base}/webhook",
            params={"token": TOKEN, "wait": 20},
            json={"image_url": site.base + "/notes.txt"},
            timeout=30,
        ).json()
        assert failed["status"] == "failed"
        page.goto(base + links.result_path(settings, uuid.UUID(failed["id"])))
        assert page.locator("h1").inner_text() == "Não foi possível analisar a radiografia"
        assert "Envie uma exportação JPEG, PNG ou DICOM" in page.locator(".alert").inner_text()
        assert "not a usable image" not in page.content()
        _shot(page, tmp_path, "failed-pt-BR")

        expired = links.sign(links.link_key(settings), uuid.UUID(accepted["id"]), 1_000_000)
        answer = page.goto(f"{base}/r/{expired}")
        assert answer.status == 410
        assert page.locator("h1").inner_text() == "Este link expirou"
        _shot(page, tmp_path, "expired-pt-BR")
        context.close()


def test_forms_refuse_a_missing_or_wrong_csrf_token(
    catalogue: Catalogue,
    tiny_embedder: Any,
) -> None:
    key = _clinic(catalogue, "Clinica A")
    with _server(catalogue, tiny_embedder) as base:
        first = httpx.get(base + "/")
        csrf = first.cookies[pages.CSRF_COOKIE]
        assert f'value="{csrf}"' in first.text
        cookies = {pages.CSRF_COOKIE: csrf}
        refused = [
            httpx.post(base + "/signin", data={"key": key}, cookies=cookies),
            httpx.post(base + "/signin", data={"key": key, "csrf": "x" * 43}, cookies=cookies),
            httpx.post(base + "/signin", data={"key": key, "csrf": csrf}),  # no cookie
            httpx.post(
                base + "/submit",
                files={"file": ("q.png", catalogue.query_png, "image/png")},
                cookies={**cookies, pages.KEY_COOKIE: key},
            ),
            httpx.post(base + "/signout", data={}, cookies=cookies),
            httpx.post(
                base + "/r/" + "A" * 50 + "/confirm", data={"implant": "x"}, cookies=cookies
            ),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        accepted = httpx.post(base + "/signin", data={"key": key, "csrf": csrf}, cookies=cookies)
        assert accepted.status_code == 303
        assert key not in accepted.headers["location"]


def test_page_uploads_history_refusals_and_the_clinics_email(
    catalogue: Catalogue,
    tiny_embedder: Any,
    mailbox: Mailbox,
    capsys: pytest.CaptureFixture,
) -> None:
    key_a = _clinic(catalogue, "Clinica A", email="recepcao@clinica-a.example")
    key_b = _clinic(catalogue, "Clinica B")
    settings = catalogue.settings.replace(secret_key=SECRET_KEY)
    with _server(
        catalogue,
        tiny_embedder,
        smtp_url=mailbox.url,
        smtp_cafile=mailbox.cafile,
        smtp_from="raiox <raiox@clinic.example>",
    ) as base:
        csrf = "c" * 43

        def upload(key: str, data: bytes, lang: str = "en") -> httpx.Response:
            return httpx.post(
                base + "/submit",
                data={"csrf": csrf},
                files={"file": ("q.png", data, "image/png")},
                cookies={pages.CSRF_COOKIE: csrf, pages.KEY_COOKIE: key},
                headers={"accept-language": lang},
            )

        def public_id(answer: httpx.Response) -> uuid.UUID:
            assert answer.status_code == 303, answer.text
            token = answer.headers["location"].rsplit("/", 1)[1]
            return links.verify(links.link_key(settings), token)

        def history(key: str) -> set[uuid.UUID]:
            page = httpx.get(base + "/", cookies={pages.KEY_COOKIE: key})
            assert page.status_code == 200
            tokens = re.findall(r'href="/r/([A-Za-z0-9_-]{50})"', page.text)
            return {links.verify(links.link_key(settings), t) for t in tokens}

        id_a = public_id(upload(key_a, catalogue.query_png, lang="en-US,en;q=0.9"))
        id_b = public_id(upload(key_b, catalogue.query_png))
        assert history(key_a) == {id_a}
        assert history(key_b) == {id_b}

        # A file the loader refuses: the reason, translated, on the upload page.
        refused = upload(key_a, b"%PDF-1.7 not an x-ray", lang="pt-BR")
        assert refused.status_code == 422
        assert "não é uma imagem de radiografia que o raiox consiga ler" in refused.text
        assert history(key_a) == {id_a}  # nothing recorded

        # Clinic A has an address: told once, in the language of its page (English).
        messages = mailbox.wait_for(1)
        time.sleep(1.0)
        assert [m["To"] for m in mailbox.messages] == ["recepcao@clinica-a.example"]
        assert messages[0]["Subject"] == "raiox: your X-ray result is ready"
    logged = capsys.readouterr().err
    assert key_a not in logged and key_b not in logged
