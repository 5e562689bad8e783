"""Every surface shows the trust fields an answer was stored with: the API (declared
in the OpenAPI schema), the result page and the e-mail, in pt-BR and English; an
uncalibrated answer says so and its scores are not coloured."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import httpx
import pytest

from raiox_cli import db, images
from raiox_cli.clinics import links
from raiox_cli.db import queries
from raiox_cli.search import query as search
from raiox_cli.search.result import Trust
from raiox_cli.server import notify, results
from tests.helpers.catalogue import Catalogue
from tests.helpers.server import TOKEN, running

pytestmark = pytest.mark.slow


def _analysis(cat: Catalogue, embedder: Any, trust: Trust | None) -> str:
    """A finished upload whose answer carried `trust` (None: the search's own)."""
    loaded = images.load_image(cat.query_png)
    key = cat.store.put(loaded.sha256, cat.query_png, content_type="image/png")
    with db.connect(cat.settings) as conn:
        result = search.search_image(conn, embedder, loaded, k=3)
        if trust is not None:
            keys = [m.key for m in result.matches]
            result = replace(result, trust=replace(trust, prediction_set=keys[:2]))
        analysis_id, _ = queries.create_analysis(
            conn, source="upload", image_sha256=loaded.sha256, storage_key=key, status="running"
        )
        queries.finish_analysis(
            conn,
            analysis_id,
            model_id=result.model_id,
            matches=result.matches,
            trust=search.stored_trust(result),
        )
        conn.commit()
        return str(queries.get_analysis(conn, analysis_id)["public_id"])


CALIBRATED = Trust(
    calibrated=True,
    verdict="not_in_catalogue",
    probability=0.62,
    set_coverage=0.9,
    out_of_catalogue=True,
    out_of_catalogue_score=0.97,
    calibration_id=7,
    calibrated_at="2026-12-06T01:00:00+00:00",
)


def test_api_page_and_email_show_the_stored_numbers(catalogue: Catalogue, tiny_embedder) -> None:
    calibrated = _analysis(catalogue, tiny_embedder, CALIBRATED)
    plain = _analysis(catalogue, tiny_embedder, None)  # random weights: uncalibrated
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        headers = {"x-raiox-token": TOKEN}
        trust = httpx.get(f"{base}/analyses/{calibrated}", headers=headers).json()["trust"]
        assert trust["calibrated"] is True and trust["probability"] == 0.62
        assert len(trust["prediction_set"]) == 2 and trust["out_of_catalogue"] is True
        assert "ranked" not in trust  # kept in the database for recalibration only
        other = httpx.get(f"{base}/analyses/{plain}", headers=headers).json()["trust"]
        assert other["calibrated"] is False and "random model weights" in other["reason"]
        assert other["probability"] is None

        schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]
        assert "trust" in schema["Analysis"]["properties"]
        assert {"probability", "prediction_set", "out_of_catalogue"} <= set(
            schema["Trust"]["properties"]
        )

        settings = catalogue.settings.replace(public_url=base)
        url = links.result_link(settings, uuid.UUID(calibrated))[0]
        english = httpx.get(url, headers={"accept-language": "en"}).text
        assert "62% likely to be the right implant" in english
        assert "With 90% confidence it is one of these 2" in english
        assert "Probably not in our catalogue" in english and "What to do" in english
        assert "verdict-not_in_catalogue" in english  # the stored verdict, not recomputed
        assert "score-ok" in english and "score-low" in english  # in the set, or not
        portuguese = httpx.get(url, headers={"accept-language": "pt-BR"}).text
        assert "62% de probabilidade de ser o implante certo" in portuguese
        assert "Com 90% de confiança é um destes 2" in portuguese

        url = links.result_link(settings, uuid.UUID(plain))[0]
        page = httpx.get(url, headers={"accept-language": "en"}).text
        assert "Uncalibrated: these scores are similarities, not probabilities" in page
        assert "score-ok" not in page and "score-low" not in page  # no coloured scores
        assert 'class="verdict"' in page

    with db.connect(catalogue.settings) as conn:
        for public_id, lang, words in (
            (calibrated, "en", ["62% likely", "one of these 2", "What to do"]),
            (calibrated, "pt-BR", ["62% de probabilidade", "um destes 2", "O que fazer"]),
            (plain, "en", ["Uncalibrated:"]),
            (plain, "pt-BR", ["Não calibrado:"]),
        ):
            row = queries.find_analysis(conn, uuid.UUID(public_id), clinic_id=None)
            view = results.analysis(
                conn, results.Links.for_worker(catalogue.store, settings), row["id"]
            )
            view["confidence"] = view["trust"]["verdict"]
            _, text, html = notify.render_email(notify.Finished(view, lang))
            for word in words:
                assert word in text and word in html
