"""Read radiographs safely: the only module that decodes pixels.

Every path that reads an image (embed, ingest, search, the server) calls
`load_image`, which returns an RGB PIL image plus what was learned about the
file, or raises an ImageError subclass with a one-line reason.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from raiox_cli.errors import RaioxError

DEFAULT_MAX_PIXELS = 80_000_000  # a 16k x 5k panoramic fits; a 50k x 50k bomb does not
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


class ImageError(RaioxError):
    """An input file that cannot be used as a radiograph."""


class UnsupportedImage(ImageError):
    pass


class ImageTooLarge(ImageError):
    pass


class CorruptImage(ImageError):
    pass


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, orientation applied, crop applied
    format: str  # JPEG, PNG, TIFF, WEBP, BMP, DICOM
    mode: str  # the original mode, e.g. "L", "I;16", "RGB", "MONOCHROME1"
    bit_depth: int
    width: int  # original size, before any crop
    height: int
    sha256: str  # of the original bytes
    size_bytes: int
    warnings: tuple[str, ...] = field(default=())


_MAGIC: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"BM", 0, "BMP"),
    (b"DICM", 128, "DICOM"),
]


def sniff_format(data: bytes) -> str | None:
    """The allow-listed format of these bytes by content, or None."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"{size} bytes is over the {max_bytes}-byte limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except PermissionError:
        raise ImageError("permission denied") from None


def load_image(
    source: Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoadedImage:
    data = source if isinstance(source, bytes) else read_bytes(Path(source), max_bytes)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{len(data)} bytes is over the {max_bytes}-byte limit")
    if not data:
        raise UnsupportedImage("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage("not a supported image (JPEG, PNG, TIFF, WebP, BMP, DICOM)")
    if fmt == "DICOM":
        raise UnsupportedImage("DICOM support is not available yet")
    return _decode_pil(data, fmt, max_pixels)


def _decode_pil(data: bytes, fmt: str, max_pixels: int) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{width}x{height} = {width * height} pixels is over the "
                    f"{max_pixels}-pixel limit"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot decode {fmt}: {exc}") from None
    mode = img.mode
    img = ImageOps.exif_transpose(img) or img
    rgb = img.convert("RGB")
    return LoadedImage(
        image=rgb,
        format=fmt,
        mode=mode,
        bit_depth=16 if mode.startswith("I;16") or mode == "I" else 8,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
