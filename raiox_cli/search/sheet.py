"""Contact sheets: the query radiograph (crop box drawn) beside its top matches'
reference images, each captioned with implant, manufacturer and score. Pillow only.

Colour follows the calibrated answer as the result page does: the implants of the
prediction set are green for a strong match and amber for a possible one; nothing is
coloured when the answer is uncalibrated (a cosine above --min-score says nothing of
how likely it is right), when no implant fits, or when the implant is probably not
in the catalogue. The title says the calibrated wording, or "uncalibrated" and why.

A sheet is read by a person, often a dentist: its words come in the languages of the
pages (pt-BR, en), in a font that has Portuguese's accents (Pillow's own has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import util
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from raiox_cli.languages import LANGUAGES, supported
from raiox_cli.search.result import Match, SearchResult, Trust

TILE_W, TILE_H = 240, 300  # image area of one tile
CAPTION_H = 64  # three caption lines under each tile
HEADER_H = 40
GAP = 12

BACKGROUND = (24, 26, 30)
TILE_BG = (0, 0, 0)
TEXT = (235, 235, 235)
MUTED = (170, 174, 182)
CONFIDENT = (96, 200, 120)
WEAK = (240, 170, 60)
CROP = (255, 80, 80)


WORDS: dict[str, dict[str, str]] = {
    "en": {
        "strong": "strong match",
        "possible": "possible match",
        "none": "no confident match",
        "not_in_catalogue": "probably not in our catalogue (nearest: {top})",
        "no_match": "no match",
        "uncalibrated": "uncalibrated{why}: best score {top}",
        "likely": ", {percent}% likely",
        "set": "; {coverage}% sure it is one of the {n} coloured",
        "score": "score {score}",
        "query": "query",
        "analysis": "analysis {id}",
        "crop": "crop in red",
        "unavailable": "image unavailable",
        "mirrored": "mirrored",
        "upside-down": "upside-down",
    },
    "pt-BR": {
        "strong": "correspondência forte",
        "possible": "correspondência possível",
        "none": "nenhuma correspondência confiável",
        "not_in_catalogue": "provavelmente fora do nosso catálogo (mais próximo: {top})",
        "no_match": "nenhuma correspondência",
        # The reasons are the operator's (English, with commands to run): not on a
        # sheet a dentist reads in Portuguese.
        "uncalibrated": "sem calibração: maior pontuação {top}",
        "likely": ", {percent}% de probabilidade",
        "set": "; {coverage}% de confiança de que é um dos {n} em cor",
        "score": "pontuação {score}",
        "query": "radiografia",
        "analysis": "análise {id}",
        "crop": "recorte em vermelho",
        "unavailable": "imagem indisponível",
        # Which orientation of the X-ray gave the score (TTA: catalogue.pipeline).
        "mirrored": "espelhada",
        "upside-down": "de cabeça para baixo",
    },
}


def words(lang: str) -> dict[str, str]:
    """The sheet's words in a language tag (pt-br, en-GB...); one raiox does not write
    in gets the default, as pages do."""
    return WORDS[supported(lang) or LANGUAGES[0]]


def score_text(score: float, lang: str) -> str:
    text = f"{score:.3f}"
    return text.replace(".", ",") if supported(lang) == "pt-BR" else text


def score_caption(
    lang: str, score: float, margin: float | None = None, orientation: str = "original"
) -> str:
    """A match's score line: the score, its margin to the next implant, and which
    orientation of the X-ray gave it (none said for the original)."""
    w = words(lang)
    return (
        w["score"].format(score=score_text(score, lang))
        + ("" if margin is None else f" (+{score_text(margin, lang)})")
        + ("" if orientation == "original" else f" {w.get(orientation, orientation)}")
    )


def accent(trust: Trust | None, key: str) -> tuple[int, int, int]:
    """A match's score colour: only a calibrated answer colours, and only its set."""
    if trust is None or not trust.calibrated or key not in trust.prediction_set:
        return TEXT
    return {"strong": CONFIDENT, "possible": WEAK}.get(trust.verdict, TEXT)


def verdict_title(trust: Trust | None, top_name: str | None, lang: str = "en") -> str:
    """The sheet's verdict in the calibrated wording (or marked uncalibrated)."""
    w = words(lang)
    if top_name is None:
        return w["no_match"]
    if trust is None or not trust.calibrated:
        why = f" ({trust.reason})" if trust is not None and trust.reason else ""
        return w["uncalibrated"].format(why=why, top=top_name)
    if trust.verdict == "not_in_catalogue":
        return w["not_in_catalogue"].format(top=top_name)
    likely = (
        w["likely"].format(percent=round(trust.probability * 100))
        if trust.probability is not None
        else ""
    )
    text = f"{w.get(trust.verdict, trust.verdict)}: {top_name}{likely}"
    if trust.prediction_set and trust.set_coverage is not None:
        text += w["set"].format(
            coverage=round(trust.set_coverage * 100), n=len(trust.prediction_set)
        )
    return text


@dataclass(frozen=True)
class Tile:
    image: Image.Image | None  # None: the reference image could not be read
    lines: tuple[str, ...]  # caption: title, subtitle, score line
    accent: tuple[int, int, int] = TEXT


def sheet_size(tiles: int) -> tuple[int, int]:
    """(width, height) of a sheet with the query tile plus `tiles` match tiles."""
    columns = tiles + 1
    return GAP + columns * (TILE_W + GAP), HEADER_H + TILE_H + CAPTION_H + GAP


def caption_box(column: int) -> tuple[int, int, int, int]:
    """The caption area of a column (0 = the query), as (left, top, right, bottom)."""
    left = GAP + column * (TILE_W + GAP)
    top = HEADER_H + TILE_H
    return left, top, left + TILE_W, top + CAPTION_H


@cache
def _dejavu() -> Path | None:
    """DejaVu Sans as matplotlib (a dependency) ships it, found without importing it."""
    spec = util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    font = _dejavu()
    try:
        if font is not None:
            return ImageFont.truetype(str(font), size)
        return ImageFont.load_default(size=size)  # its glyphs lack ç, ã, é...
    except (OSError, ImportError, TypeError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _picture(
    image: Image.Image | None, crop_box: tuple[int, int, int, int] | None, lang: str
) -> Image.Image:
    tile = Image.new("RGB", (TILE_W, TILE_H), TILE_BG)
    if image is None:
        draw = ImageDraw.Draw(tile)
        unavailable = words(lang)["unavailable"]
        draw.text((TILE_W // 2, TILE_H // 2), unavailable, fill=MUTED, font=_font(14), anchor="mm")
        return tile
    fitted = ImageOps.contain(image.convert("RGB"), (TILE_W, TILE_H))
    offset = ((TILE_W - fitted.width) // 2, (TILE_H - fitted.height) // 2)
    tile.paste(fitted, offset)
    if crop_box is not None:
        scale = fitted.width / image.width
        x, y, w, h = crop_box
        box = [
            offset[0] + x * scale,
            offset[1] + y * scale,
            offset[0] + (x + w) * scale - 1,
            offset[1] + (y + h) * scale - 1,
        ]
        ImageDraw.Draw(tile).rectangle(box, outline=CROP, width=2)
    return tile


def render(
    query: Tile,
    matches: Sequence[Tile],
    *,
    title: str,
    crop_box: tuple[int, int, int, int] | None = None,
    lang: str = "en",
) -> Image.Image:
    """The whole sheet. `query.image` is the uncropped radiograph when crop_box is given."""
    sheet = Image.new("RGB", sheet_size(len(matches)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (GAP, HEADER_H // 2),
        _fit_text(draw, title, _font(18), sheet.width - 2 * GAP),
        fill=TEXT,
        font=_font(18),
        anchor="lm",
    )
    for column, tile in enumerate([query, *matches]):
        left = GAP + column * (TILE_W + GAP)
        picture = _picture(tile.image, crop_box if column == 0 else None, lang)
        sheet.paste(picture, (left, HEADER_H))
        top = HEADER_H + TILE_H + 4
        for row, line in enumerate(tile.lines[:3]):
            font = _font(15 if row == 0 else 13)
            colour = tile.accent if row == 2 else (TEXT if row == 0 else MUTED)
            draw.text(
                (left + 2, top + row * 19),
                _fit_text(draw, line, font, TILE_W - 4),
                fill=colour,
                font=font,
            )
    return sheet


def write_sheet(
    path: Path,
    query_image: Image.Image,
    result: SearchResult,
    load_reference: Callable[[Match], Image.Image | None],
    *,
    query_name: str,
    lang: str = "en",
) -> Path:
    """Render a search result to a PNG at `path`, its words in `lang`."""
    matches, trust = result.matches, result.trust
    w = words(lang)
    verdict = verdict_title(trust, matches[0].name if matches else None, lang)
    tiles = [
        Tile(
            load_reference(m),
            (
                f"#{m.rank} {m.name}",
                m.manufacturer + (f" · {m.system}" if m.system else ""),
                score_caption(lang, m.score, m.margin, m.orientation),
            ),
            accent(trust, m.key),
        )
        for m in matches
    ]
    query = Tile(query_image, (w["query"], query_name, w["crop"] if result.crop_box else ""))
    sheet = render(
        query, tiles, title=f"{query_name}: {verdict}", crop_box=result.crop_box, lang=lang
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
