from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from raiox_cli.catalogue.pipeline import ORIENTATIONS
from raiox_cli.search import sheet
from raiox_cli.search.query import Match, SearchResult
from raiox_cli.search.result import Trust


def _radiograph(shade: int, size: tuple[int, int] = (120, 160)) -> Image.Image:
    data = np.full((size[1], size[0]), 30, dtype=np.uint8)
    data[40:120, 50:70] = shade
    return Image.fromarray(data).convert("RGB")


def _match(rank: int, score: float) -> Match:
    return Match(
        rank=rank,
        implant_id=rank,
        key=f"acme/a/implant {rank}",
        name=f"Implant {rank}",
        manufacturer="Acme",
        system="A",
        diameter_mm=4.0,
        length_mm=10.0,
        connection=None,
        image_id=rank,
        storage_key=None,
        source_path=None,
        image_path=None,
        score=score,
        margin=0.01,
    )


def _pixels(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(img.crop(box), dtype=np.int16)


def test_layout_size_grows_with_matches() -> None:
    one, three = sheet.sheet_size(1), sheet.sheet_size(3)
    assert one[1] == three[1]
    assert three[0] - one[0] == 2 * (sheet.TILE_W + sheet.GAP)


def test_captions_are_drawn_in_their_areas() -> None:
    query = sheet.Tile(_radiograph(200), ("query", "x.png", ""))
    captioned = [
        sheet.Tile(_radiograph(150 + i), (f"#{i} Implant", "Acme", "score 0.9")) for i in range(3)
    ]
    blank = [sheet.Tile(t.image, ("", "", "")) for t in captioned]
    with_text = sheet.render(query, captioned, title="t")
    without = sheet.render(query, blank, title="t")
    assert with_text.size == sheet.sheet_size(3)
    for column in range(1, 4):
        box = sheet.caption_box(column)
        changed = np.abs(_pixels(with_text, box) - _pixels(without, box)).sum(axis=2) > 0
        assert changed.sum() > 50, f"no caption drawn in column {column}"
    # The pictures themselves are the same in both.
    top = (0, sheet.HEADER_H, with_text.width, sheet.HEADER_H + sheet.TILE_H)
    assert np.array_equal(_pixels(with_text, top), _pixels(without, top))


def test_crop_box_drawn_on_the_query_only() -> None:
    image = _radiograph(200)
    query = sheet.Tile(image, ("query", "", ""))
    boxed = sheet.render(query, [], title="t", crop_box=(10, 20, 60, 80))
    plain = sheet.render(query, [], title="t")
    region = (sheet.GAP, sheet.HEADER_H, sheet.GAP + sheet.TILE_W, sheet.HEADER_H + sheet.TILE_H)
    red = _pixels(boxed, region)
    is_red = (red[..., 0] == sheet.CROP[0]) & (red[..., 1] == sheet.CROP[1])
    assert is_red.sum() > 100
    assert not np.array_equal(red, _pixels(plain, region))


def test_write_sheet_is_a_png_of_the_layout(tmp_path: Path) -> None:
    result = SearchResult("m:none", [_match(1, 0.95), _match(2, 0.7)], min_score=0.9)
    images = {1: _radiograph(180), 2: None}  # the second reference image is missing
    out = sheet.write_sheet(
        tmp_path / "sub" / "sheet.png",
        _radiograph(220),
        result,
        lambda m: images[m.rank],
        query_name="q.png",
    )
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == sheet.sheet_size(2)
        img.verify()


@pytest.mark.parametrize("text", ["short", "a very long implant name " * 6])
def test_long_captions_stay_inside_the_tile(text: str) -> None:
    tile = sheet.Tile(None, (text, text, text))
    img = sheet.render(tile, [], title=text)
    # Nothing is drawn in the right-hand gap beyond the only tile.
    gap = (sheet.GAP + sheet.TILE_W + 1, sheet.HEADER_H, img.width, img.height)
    assert (np.asarray(img.crop(gap)) == sheet.BACKGROUND).all()


def test_every_language_has_the_same_words_and_placeholders() -> None:
    import string

    def fields(text: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name}

    english = sheet.WORDS["en"]
    assert set(sheet.LANGUAGES) == set(sheet.WORDS)
    for lang, words in sheet.WORDS.items():
        assert words.keys() == english.keys(), lang
        for key, text in words.items():
            # pt-BR's uncalibrated title leaves out the operator's English reason.
            expected = fields(english[key]) - ({"why"} if lang == "pt-BR" else set())
            assert fields(text) == expected, (lang, key)


def test_the_title_follows_the_language() -> None:
    trust = Trust(True, "strong", probability=0.874, prediction_set=["a", "b"], set_coverage=0.9)
    assert sheet.verdict_title(trust, "Corvid 4.1x13", "pt-BR") == (
        "correspondência forte: Corvid 4.1x13, 87% de probabilidade; "
        "90% de confiança de que é um dos 2 em cor"
    )
    assert sheet.verdict_title(trust, "Corvid 4.1x13", "en") == (
        "strong match: Corvid 4.1x13, 87% likely; 90% sure it is one of the 2 coloured"
    )
    outside = Trust(True, "not_in_catalogue")
    assert "fora do nosso catálogo" in sheet.verdict_title(outside, "X", "pt-BR")
    raw = Trust(False, "strong", reason='model m has no calibration; run "raiox calibrate"')
    assert sheet.verdict_title(raw, "X", "en").startswith("uncalibrated (model m has no")
    assert sheet.verdict_title(raw, "X", "pt-BR") == "sem calibração: maior pontuação X"
    assert sheet.score_text(0.9264, "pt-BR") == "0,926"
    # Every orientation search may score from has its words (original shows none).
    assert set(ORIENTATIONS) - {"original"} <= sheet.WORDS["pt-BR"].keys()
    assert sheet.verdict_title(None, None, "en-GB") == "no match"
    assert sheet.words("pt_br") is sheet.words("pt-BR")  # RAIOX_LANG as an operator types it
    # A language raiox does not write in: the default, pt-BR, as the pages.
    assert sheet.verdict_title(None, None, "xx") == "nenhuma correspondência"


def test_portuguese_letters_are_drawn_not_boxes() -> None:
    """Pillow's own font draws ç, ã and é as one and the same box."""
    font = sheet._font(18)

    def drawn(text: str) -> bytes:
        img = Image.new("L", (60, 40))
        ImageDraw.Draw(img).text((5, 5), text, font=font, fill=255)
        return img.tobytes()

    glyphs = {drawn(c) for c in "çãéêó"}
    assert len(glyphs) == 5


def test_write_sheet_in_portuguese_differs_from_english(tmp_path: Path) -> None:
    result = SearchResult("m:none", [_match(1, 0.95)], min_score=0.9)
    drawn = {
        lang: sheet.write_sheet(
            tmp_path / f"{lang}.png",
            _radiograph(220),
            result,
            lambda m: None,
            query_name="q.png",
            lang=lang,
        )
        for lang in sheet.LANGUAGES
    }
    with Image.open(drawn["en"]) as en, Image.open(drawn["pt-BR"]) as pt:
        header = (0, 0, en.width, sheet.HEADER_H)
        assert not np.array_equal(_pixels(en, header), _pixels(pt, header))
        caption = sheet.caption_box(1)
        assert not np.array_equal(_pixels(en, caption), _pixels(pt, caption))
