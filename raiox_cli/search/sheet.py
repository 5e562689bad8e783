"""Contact sheets: the query radiograph (crop box drawn) beside its top matches'
reference images, each captioned with implant, manufacturer and score. Pillow only.

Colour follows the calibrated answer as the result page does: the implants of the
prediction set are green for a strong match and amber for a possible one; nothing is
coloured when the answer is uncalibrated (a cosine above --min-score says nothing of
how likely it is right), when no implant fits, or when the implant is probably not
in the catalogue. The title says the calibrated wording, or "uncalibrated" and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

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


WORDS = {
    "strong": "strong match",
    "possible": "possible match",
    "none": "no confident match",
    "not_in_catalogue": "probably not in our catalogue",
}


def accent(trust: Trust | None, key: str) -> tuple[int, int, int]:
    """A match's score colour: only a calibrated answer colours, and only its set."""
    if trust is None or not trust.calibrated or key not in trust.prediction_set:
        return TEXT
    return {"strong": CONFIDENT, "possible": WEAK}.get(trust.verdict, TEXT)


def verdict_title(trust: Trust | None, top_name: str | None) -> str:
    """The sheet's verdict in the calibrated wording (or marked uncalibrated)."""
    if top_name is None:
        return "no match"
    if trust is None or not trust.calibrated:
        why = f" ({trust.reason})" if trust is not None and trust.reason else ""
        return f"uncalibrated{why}: best score {top_name}"
    if trust.verdict == "not_in_catalogue":
        return f"{WORDS['not_in_catalogue']} (nearest: {top_name})"
    likely = f", {trust.probability:.0%} likely" if trust.probability is not None else ""
    words = f"{WORDS.get(trust.verdict, trust.verdict)}: {top_name}{likely}"
    if trust.prediction_set and trust.set_coverage is not None:
        words += (
            f"; {trust.set_coverage:.0%} sure it is one of the {len(trust.prediction_set)} coloured"
        )
    return words


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
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _picture(image: Image.Image | None, crop_box: tuple[int, int, int, int] | None) -> Image.Image:
    tile = Image.new("RGB", (TILE_W, TILE_H), TILE_BG)
    if image is None:
        draw = ImageDraw.Draw(tile)
        draw.text(
            (TILE_W // 2, TILE_H // 2), "image unavailable", fill=MUTED, font=_font(14), anchor="mm"
        )
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
        sheet.paste(_picture(tile.image, crop_box if column == 0 else None), (left, HEADER_H))
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
) -> Path:
    """Render a search result to a PNG at `path`."""
    matches, trust = result.matches, result.trust
    verdict = verdict_title(trust, matches[0].name if matches else None)
    tiles = [
        Tile(
            load_reference(m),
            (
                f"#{m.rank} {m.name}",
                m.manufacturer + (f" · {m.system}" if m.system else ""),
                f"score {m.score:.3f}"
                + ("" if m.margin is None else f" (+{m.margin:.3f})")
                + ("" if m.orientation == "original" else f" {m.orientation}"),
            ),
            accent(trust, m.key),
        )
        for m in matches
    ]
    query = Tile(query_image, ("query", query_name, "crop in red" if result.crop_box else ""))
    sheet = render(query, tiles, title=f"{query_name}: {verdict}", crop_box=result.crop_box)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
