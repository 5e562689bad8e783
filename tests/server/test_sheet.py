"""GET /analyses/{id}/sheet.png: the contact sheet the CLI draws, for API clients."""

from __future__ import annotations

import io
from typing import Any

import httpx
from PIL import Image

from raiox_cli.search import sheet
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, running


def test_sheet_png_of_a_finished_analysis(
    catalogue: Catalogue,
    tiny_embedder: Any,
) -> None:
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        auth = {"authorization": f"Bearer {TOKEN}"}
        done = httpx.post(
            f"{base}/upload?k=3",
            files={"file": ("q.png", catalogue.query_png, "image/png")},
            headers=auth,
            timeout=30,
        ).json()
        answer = httpx.get(f"{base}/analyses/{done['id']}/sheet.png", headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        drawn = Image.open(io.BytesIO(answer.content))
        assert drawn.size == sheet.sheet_size(3)
        # The query tile holds the stored X-ray, not the "image unavailable" placeholder.
        left, top = sheet.GAP, sheet.HEADER_H
        tile = drawn.crop((left, top, left + sheet.TILE_W, top + sheet.TILE_H)).convert("L")
        assert tile.getextrema()[1] > 100

        # Its words: ?lang=, else the analysis's language, else RAIOX_LANG (pt-BR here).
        def header(query: str) -> bytes:
            got = httpx.get(f"{base}/analyses/{done['id']}/sheet.png{query}", headers=auth)
            assert got.status_code == 200, got.text
            img = Image.open(io.BytesIO(got.content))
            return img.crop((0, 0, img.width, sheet.HEADER_H)).tobytes()

        english, portuguese = header("?lang=en"), header("?lang=pt-BR")
        assert english != portuguese
        assert header("") == portuguese == header("?lang=pt")
        assert header("?lang=klingon") == portuguese  # unknown: the default, not an error
        too_long = httpx.get(
            f"{base}/analyses/{done['id']}/sheet.png?lang={'x' * 17}", headers=auth
        )
        assert too_long.status_code == 422

        assert httpx.get(f"{base}/analyses/{done['id']}/sheet.png").status_code == 401
        assert httpx.get(f"{base}/analyses/999999/sheet.png", headers=auth).status_code == 404
