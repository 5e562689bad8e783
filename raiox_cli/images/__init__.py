"""Read radiographs safely: the only module that decodes pixels.

Every path that reads an image (embed, ingest, search, the server) calls
`load_image`, which returns an 8-bit grey or RGB PIL image plus what was learned about the
file, or raises an ImageError subclass with a one-line reason.

Formats are recognised by content (magic bytes), never by name. Limits are
checked before pixels are decoded: bytes from the file size, pixels from the
header. `load_image` mutates no global state, so worker threads may share it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from raiox_cli.images.base import (
    COMPRESSED_DICOM_HINT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    SUPPORTED,
    BadCrop,
    CorruptImage,
    CropOutsideImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    bytes_message,
    describe,
    sniff_format,
)
from raiox_cli.images.dicom import decode_dicom
from raiox_cli.images.pil import decode_pil

__all__ = [
    "COMPRESSED_DICOM_HINT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED",
    "BadCrop",
    "CorruptImage",
    "Crop",
    "CropOutsideImage",
    "EmptyImage",
    "ImageError",
    "ImageTooLarge",
    "LoadedImage",
    "UnsupportedImage",
    "check_size",
    "load_image",
    "parse_crop",
    "read_bytes",
    "sniff_format",
]

_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Crop:
    """A region of interest: pixels (ints) or fractions of the width/height."""

    x: float
    y: float
    w: float
    h: float
    fractional: bool = False

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) in pixels of an image this size; CropOutsideImage if it overflows."""
        if self.fractional:
            x0, y0 = round(self.x * width), round(self.y * height)
            x1 = min(width, max(x0 + 1, round((self.x + self.w) * width)))
            y1 = min(height, max(y0 + 1, round((self.y + self.h) * height)))
            if x0 >= width or y0 >= height:
                raise CropOutsideImage(f"crop {self} is outside the {width}x{height} image")
            return x0, y0, x1 - x0, y1 - y0
        x, y, w, h = int(self.x), int(self.y), int(self.w), int(self.h)
        if x + w > width or y + h > height:
            raise CropOutsideImage(
                f"crop {x},{y},{w},{h} reaches {x + w},{y + h}, outside the {width}x{height} image"
            )
        return x, y, w, h

    def __str__(self) -> str:
        return ",".join(f"{v:g}" if self.fractional else str(int(v)) for v in self.values)

    @property
    def values(self) -> tuple[float, float, float, float]:
        return self.x, self.y, self.w, self.h


def parse_crop(text: str) -> Crop:
    """'x,y,w,h' in whole pixels ('100,50,400,300') or fractions ('0.5,0,0.5,1.0')."""
    hint = "expected x,y,w,h in pixels (100,50,400,300) or fractions (0.5,0,0.5,1.0)"
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(parts):
        raise BadCrop(f"crop {text!r}: {hint}")
    if all(_INT.match(p) for p in parts):
        x, y, w, h = (int(p) for p in parts)
        if x < 0 or y < 0 or w < 1 or h < 1:
            raise BadCrop(f"crop {text!r}: x,y must be >= 0 and w,h >= 1 pixels")
        return Crop(x, y, w, h)
    try:
        x, y, w, h = (float(p) for p in parts)
    except ValueError:
        raise BadCrop(f"crop {text!r}: {hint}") from None
    values = (x, y, w, h)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise BadCrop(
            f"crop {text!r}: fractions must all lie in [0, 1]; for pixels use whole numbers"
        )
    if w <= 0 or h <= 0 or x + w > 1.0 + 1e-9 or y + h > 1.0 + 1e-9:
        raise BadCrop(f"crop {text!r}: fractions need w,h > 0, x+w <= 1 and y+h <= 1")
    return Crop(x, y, w, h, fractional=True)


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # "L" (grey sources) or "RGB", 8 bits, orientation + crop applied
    format: str  # JPEG, PNG, TIFF, WEBP, BMP, DICOM
    mode: str  # the original mode, e.g. "L", "I;16", "RGB", "MONOCHROME1"
    bit_depth: int  # of the stored samples (DICOM: Bits Stored)
    width: int  # after orientation, before any crop (crop_box is in these pixels)
    height: int
    sha256: str  # of the original bytes
    size_bytes: int
    warnings: tuple[str, ...] = field(default=())
    crop_box: tuple[int, int, int, int] | None = None  # (x, y, w, h) actually applied


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, refusing before reading when it is over `max_bytes`."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(bytes_message(size, max_bytes))
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(bytes_message(len(data), max_bytes))
    return data


def check_size(size: int, max_bytes: int) -> None:
    """Refuse bytes over the limit before reading them (for sources other than files)."""
    if size > max_bytes:
        raise ImageTooLarge(bytes_message(size, max_bytes))


def load_image(
    source: Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    crop: Crop | None = None,
    sha256: str | None = None,
    decode_to: int | None = None,
) -> LoadedImage:
    """Decode a radiograph to 8-bit grey or RGB, or raise an ImageError with a one-line reason.
    `sha256`: the bytes' hash when the caller has it already (not computed twice).
    `decode_to`: the shortest side the caller needs (no crop): a JPEG may then be
    decoded at a reduced DCT scale (1/2, 1/4, 1/8) that still has it; width and
    height stay the file's."""
    data = source if isinstance(source, bytes) else read_bytes(Path(source), max_bytes)
    if len(data) > max_bytes:
        raise ImageTooLarge(bytes_message(len(data), max_bytes))
    if not data:
        raise EmptyImage("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage(
            f"not a supported image: looks like {describe(data)} (supported: {SUPPORTED})"
        )
    if fmt == "DICOM":
        decoded = decode_dicom(data, max_pixels)
    else:
        decoded = decode_pil(data, fmt, max_pixels, None if crop else decode_to)
    rgb = decoded.rgb
    width, height = decoded.size or rgb.size
    crop_box = None
    if crop is not None:
        crop_box = crop.box(width, height)
        x, y, w, h = crop_box
        rgb = rgb.crop((x, y, x + w, y + h))
    return LoadedImage(
        image=rgb,
        format=fmt,
        mode=decoded.mode,
        bit_depth=decoded.bit_depth,
        width=width,
        height=height,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        warnings=decoded.warnings,
        crop_box=crop_box,
    )
