"""JPEG, PNG, TIFF, WebP and BMP through Pillow: only the sniffed format's plugin runs, the
pixel cap is checked from the header, EXIF orientation applied once. The common PNG
(8/16-bit grey or 8-bit RGB, nothing but pixels) may go through Wuffs (images/png.py)."""

from __future__ import annotations

import io
import math
import re
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from raiox_cli.images import png
from raiox_cli.images.base import (
    CorruptImage,
    Decoded,
    ImageError,
    ImageTooLarge,
    one_line,
    pixels_message,
)
from raiox_cli.images.levels import grey_image, window

# Our cap, checked from the header, is the policy; Pillow's own warning would
# only repeat it (its hard error at 2x its limit still stands behind ours).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_BIT_DEPTH = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def decode_pil(data: bytes, fmt: str, max_pixels: int, decode_to: int | None = None) -> Decoded:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process switched it on; half-decoded X-rays must not pass.
        raise CorruptImage("refusing to decode: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set")
    try:
        # formats= keeps Pillow to the format we sniffed: no other plugin gets a try.
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(pixels_message(width, height, max_pixels))
        if fmt == "PNG" and (pixels := png.decode(data, img)) is not None:
            # No EXIF, one frame: nothing else to apply. 16-bit grey windowed as below.
            grey_or_rgb = Image.fromarray(pixels if pixels.dtype == np.uint8 else window(pixels))
            return Decoded(grey_or_rgb, img.mode, _BIT_DEPTH.get(img.mode, 8))
        if decode_to and fmt == "JPEG" and min(width, height) >= 2 * decode_to:
            scale = min(width, height) / decode_to
            img.draft(img.mode, (math.ceil(width / scale), math.ceil(height / scale)))
        img.load()
        orientation = _orientation(img)
        rgb = _to_grey_or_rgb(img)
        frames = getattr(img, "n_frames", 1)  # TIFF walks its page chain here
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        found = _BOMB_PIXELS.search(str(exc))
        count = f"{found.group(1)} pixels" if found else "the image"
        raise ImageTooLarge(
            f"{count} is over the {max_pixels}-pixel limit (RAIOX_MAX_PIXELS) and Pillow's "
            f"hard limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)}"
        ) from None
    except UnidentifiedImageError:
        raise CorruptImage(f"cannot decode {fmt}: its header is damaged or not {fmt}") from None
    except MemoryError:
        raise ImageTooLarge(f"out of memory decoding this {fmt}") from None
    except Exception as exc:  # Pillow's plugins raise many types on hostile input
        reason = one_line(exc)
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise CorruptImage(f"cannot decode {fmt}: {reason}") from exc
    mode = img.mode
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    notes = (f"{frames} frames/pages: used the first",) if frames > 1 else ()
    size = None
    if img.size != (width, height):  # decoded at a reduced scale (draft)
        size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return Decoded(rgb, mode, _BIT_DEPTH.get(mode, 8), notes, size)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return 1  # unreadable EXIF: the pixels are still good, keep them as stored


def _to_grey_or_rgb(img: Image.Image) -> Image.Image:
    """8-bit grey ("L") for grey sources, else RGB. Grey stays one channel: the
    model's preprocessing resizes first and converts to RGB after, which gives the
    same tensor as converting first at a third of the resize cost."""
    mode = img.mode
    if mode == "RGB" or (mode == "L" and not img.has_transparency_data):
        return img
    if mode in _BIT_DEPTH and mode != "1":  # 16/32-bit integer or float grey
        return grey_image(window(np.asarray(img)))
    if img.has_transparency_data:
        # Transparent areas of an X-ray are background: composite them onto black.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode in ("1", "LA", "P") and _is_grey(img):
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, colour palettes


def _is_grey(img: Image.Image) -> bool:
    if img.mode != "P":
        return True
    palette = img.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))
