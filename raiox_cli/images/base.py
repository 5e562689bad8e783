"""What every decoder shares: the limits, the errors, the decoded result, recognising
a format by its bytes, and the one-line messages."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from raiox_cli.errors import RaioxError, UsageError

DEFAULT_MAX_PIXELS = 80_000_000  # a 16k x 5k panoramic fits; a 50k x 50k bomb does not
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
SUPPORTED = "JPEG, PNG, TIFF, WebP, BMP, DICOM"
COMPRESSED_DICOM_HINT = "pip install 'raiox[dicom-compressed]'"

# DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
_MAGIC: list[tuple[bytes, int, str]] = [
    (b"DICM", 128, "DICOM"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"BM", 0, "BMP"),
]

# Recognised only to say what a refused file is.
_NOT_IMAGES: list[tuple[bytes, int, str]] = [
    (b"GIF8", 0, "GIF"),
    (b"%PDF", 0, "PDF"),
    (b"PK\x03\x04", 0, "ZIP archive"),
    (b"\x1f\x8b", 0, "gzip data"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000 codestream"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypavif", 4, "AVIF"),
    (b"II+\x00", 0, "BigTIFF"),
    (b"MM\x00+", 0, "BigTIFF"),
]


class ImageError(RaioxError):
    """An input file that cannot be used as a radiograph."""


class UnsupportedImage(ImageError):
    """Not one of the allow-listed formats, or a variant of one we cannot read."""


class EmptyImage(UnsupportedImage):
    """A zero-byte file."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit."""


class CorruptImage(ImageError):
    """An allow-listed format that does not decode: truncated or damaged."""


class CropOutsideImage(ImageError):
    """The requested crop box does not lie inside the image."""


class BadCrop(UsageError):
    """A crop box string that does not parse."""


@dataclass(frozen=True)
class Decoded:
    rgb: Image.Image
    mode: str
    bit_depth: int
    warnings: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  # the file's (w, h) after orientation, if not rgb's


def looks_like_bare_dicom(data: bytes) -> bool:
    """DICOM without the 128-byte preamble: starts with a group 0002/0008 element."""
    if len(data) < 12:
        return False
    if data[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
        return False
    vr = data[4:6]
    explicit = vr.isalpha() and vr.isupper()
    implicit_length = int.from_bytes(data[4:8], "little")
    return explicit or implicit_length < min(len(data), 1024)


def sniff_format(data: bytes) -> str | None:
    """The allow-listed format of these bytes by content, or None."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if looks_like_bare_dicom(data):
        return "DICOM"
    return None


def describe(data: bytes) -> str:
    """A few words on what a non-image file seems to be, for the error message."""
    for magic, offset, name in _NOT_IMAGES:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:1024]
    if head.lstrip()[:1] == b"<":
        return "HTML/XML text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary data"
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return "unknown binary data"


def bytes_message(size: int, max_bytes: int) -> str:
    return f"file of {size} bytes is over the {max_bytes}-byte limit (RAIOX_MAX_BYTES)"


def pixels_message(width: int, height: int, max_pixels: int) -> str:
    return (
        f"{width}x{height} = {width * height} pixels is over the {max_pixels}-pixel limit "
        "(RAIOX_MAX_PIXELS)"
    )


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
