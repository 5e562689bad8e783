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
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from raiox_cli.errors import RaioxError, UsageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DEFAULT_MAX_PIXELS = 80_000_000  # a 16k x 5k panoramic fits; a 50k x 50k bomb does not
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
SUPPORTED = "JPEG, PNG, TIFF, WebP, BMP, DICOM"
COMPRESSED_DICOM_HINT = "pip install 'raiox[dicom-compressed]'"

# Robust window for high-bit-depth images without their own window: outliers
# (dead pixels, burnt-in labels) must not squash the anatomy into a few greys.
WINDOW_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 4_000_000  # pixels looked at to estimate the window

# Our cap, checked from the header, is the policy; Pillow's own warning would
# only repeat it (its hard error at 2x its limit still stands behind ours).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


_INT = re.compile(r"^[+-]?\d+$")


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


def _looks_like_bare_dicom(data: bytes) -> bool:
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
    if _looks_like_bare_dicom(data):
        return "DICOM"
    return None


def _describe(data: bytes) -> str:
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


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, refusing before reading when it is over `max_bytes`."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(_bytes_message(size, max_bytes))
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(_bytes_message(len(data), max_bytes))
    return data


def check_size(size: int, max_bytes: int) -> None:
    """Refuse bytes over the limit before reading them (for sources other than files)."""
    if size > max_bytes:
        raise ImageTooLarge(_bytes_message(size, max_bytes))


def _bytes_message(size: int, max_bytes: int) -> str:
    return f"file of {size} bytes is over the {max_bytes}-byte limit (RAIOX_MAX_BYTES)"


def _pixels_message(width: int, height: int, max_pixels: int) -> str:
    return (
        f"{width}x{height} = {width * height} pixels is over the {max_pixels}-pixel limit "
        "(RAIOX_MAX_PIXELS)"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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
        raise ImageTooLarge(_bytes_message(len(data), max_bytes))
    if not data:
        raise EmptyImage("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage(
            f"not a supported image: looks like {_describe(data)} (supported: {SUPPORTED})"
        )
    if fmt == "DICOM":
        decoded = _decode_dicom(data, max_pixels)
    else:
        decoded = _decode_pil(data, fmt, max_pixels, None if crop else decode_to)
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


@dataclass(frozen=True)
class _Decoded:
    rgb: Image.Image
    mode: str
    bit_depth: int
    warnings: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  # the file's (w, h) after orientation, if not rgb's


# --- Pillow formats ---------------------------------------------------------------

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


def _decode_pil(data: bytes, fmt: str, max_pixels: int, decode_to: int | None = None) -> _Decoded:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process switched it on; half-decoded X-rays must not pass.
        raise CorruptImage("refusing to decode: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set")
    try:
        # formats= keeps Pillow to the format we sniffed: no other plugin gets a try.
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(_pixels_message(width, height, max_pixels))
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
        reason = _one_line(exc)
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
    return _Decoded(rgb, mode, _BIT_DEPTH.get(mode, 8), notes, size)


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
        return _grey_image(_window(np.asarray(img)))
    if img.has_transparency_data:
        # Transparent areas of an X-ray are background: composite them onto black.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode in ("1", "LA", "P") and _is_grey(img):
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, colour palettes


def _window(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale to uint8 between lo and hi (default: robust percentiles); never wraps."""
    distinct = _distinct(arr)
    if distinct is not None:
        domain, index, counts = distinct
        if lo is None or hi is None:
            lo, hi = _robust_range(domain, counts)
        return _window(domain.astype(np.float64), lo, hi)[index]
    if lo is None or hi is None:
        lo, hi = _robust_range(arr)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.nan_to_num(scaled, nan=0.0).round().astype(np.uint8)


def _distinct(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For <=16-bit integers: (every value from min to max, each pixel's index into it,
    how often each occurs). Per-pixel maps then run once per value, not per pixel."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or arr.size == 0:
        return None
    low = int(arr.min())
    index = arr.astype(np.int32)
    index -= low
    domain = np.arange(low, int(arr.max()) + 1, dtype=np.int64)
    return domain, index, np.bincount(index.ravel(), minlength=domain.size)


def _robust_range(values: np.ndarray, counts: np.ndarray | None = None) -> tuple[float, float]:
    """The WINDOW_PERCENTILES of the values (weighted by counts when given); the full
    range when those coincide (a nearly flat image)."""
    flat = values.ravel()
    if counts is None and flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: flat.size // _PERCENTILE_SAMPLE + 1]
    flat = flat.astype(np.float64)
    weights = np.ones(flat.size) if counts is None else counts.ravel().astype(np.float64)
    keep = np.isfinite(flat) & (weights > 0)
    flat, weights = flat[keep], weights[keep]
    if flat.size == 0:
        return 0.0, 0.0
    order = np.argsort(flat, kind="stable")
    flat, cdf = flat[order], np.cumsum(weights[order])
    lo, hi = (
        float(flat[min(int(np.searchsorted(cdf, q / 100 * cdf[-1])), flat.size - 1)])
        for q in WINDOW_PERCENTILES
    )
    if hi <= lo:
        lo, hi = float(flat[0]), float(flat[-1])
    return lo, hi


def _grey_image(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey))


def _is_grey(img: Image.Image) -> bool:
    if img.mode != "P":
        return True
    palette = img.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))


# --- DICOM ------------------------------------------------------------------------


def _decode_dicom(data: bytes, max_pixels: int) -> _Decoded:
    """pydicom parses lazily, so damage can surface at any element access: every
    exception past this boundary is the file's fault and becomes one ImageError."""
    import pydicom

    preamble = data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not preamble)
    except Exception as exc:
        if not preamble:
            raise UnsupportedImage(
                f"not a supported image: looks like {_describe(data)} (supported: {SUPPORTED})"
            ) from exc
        raise CorruptImage(f"cannot read DICOM: {_one_line(exc)}") from exc
    try:
        return _dicom_pixels(ds, preamble, data, max_pixels)
    except ImageError:
        raise
    except MemoryError:
        raise ImageTooLarge("out of memory decoding this DICOM") from None
    except Exception as exc:
        hint = _hint(ds)
        error = UnsupportedImage if hint else CorruptImage  # a decoder's gap, not bad bytes
        raise error(f"cannot decode DICOM: {_one_line(exc)}{hint}") from exc


def _dicom_pixels(ds: Dataset, preamble: bool, data: bytes, max_pixels: int) -> _Decoded:
    if preamble and len(ds) == 0 and not getattr(ds, "file_meta", None):
        raise CorruptImage("DICOM file has no readable elements after its DICM marker")
    if "PixelData" not in ds or not ds.get("Rows") or not ds.get("Columns"):
        if not preamble and len(ds) < 2:  # forced read of something that only resembled DICOM
            raise UnsupportedImage(
                f"not a supported image: looks like {_describe(data)} (supported: {SUPPORTED})"
            )
        raise UnsupportedImage(
            "DICOM file holds no image (no Pixel Data, Rows or Columns): a report, or truncated"
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns > max_pixels:
        raise ImageTooLarge(_pixels_message(columns, rows, max_pixels))
    frames = int(ds.get("NumberOfFrames") or 1)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    _set_transfer_syntax(ds)
    _require_decoder(ds)
    arr = _first_frame(ds)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        rgb = _grey_image(_dicom_grey(arr, ds, photometric))
    else:
        rgb = _dicom_colour(arr, ds, bits)
    notes = (f"multi-frame DICOM ({frames} frames): used the first",) if frames > 1 else ()
    return _Decoded(rgb, photometric, bits, notes)


def _hint(ds: Dataset) -> str:
    """For compressed pixels that failed without pylibjpeg: say how to add it."""
    from pydicom.pixels import get_decoder

    try:
        syntax = ds.file_meta.TransferSyntaxUID
        if not syntax.is_compressed or "pylibjpeg" in get_decoder(syntax).available_plugins:
            return ""
    except Exception:  # a damaged meta header: no hint to give
        return ""
    return f"; a fuller decoder may read it: {COMPRESSED_DICOM_HINT}"


def _set_transfer_syntax(ds: Dataset) -> None:
    """Files without a meta header: record the encoding pydicom found, for the decoder."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def _require_decoder(ds: Dataset) -> None:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        raise UnsupportedImage(
            f"DICOM transfer syntax {syntax} ({getattr(syntax, 'name', 'unknown')}) "
            "is not supported"
        ) from None
    if not decoder.is_available:
        raise UnsupportedImage(
            f"DICOM compressed as {syntax.name} needs a decoder that is not installed: "
            f"{COMPRESSED_DICOM_HINT}"
        )


def _first_frame(ds: Dataset) -> np.ndarray:
    from pydicom.pixels import pixel_array

    # index=0 decodes one frame: a 1000-frame cine costs one frame's memory.
    arr = pixel_array(ds, index=0)
    while arr.ndim > 3 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        arr = arr[0]
    return arr


def _dicom_grey(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Modality LUT/rescale -> VOI LUT or first window -> 8 bits -> polarity, once."""
    distinct = _distinct(arr)
    if distinct is None:
        grey = _grey_levels(arr, ds, None)
    else:
        # Every step is per pixel: run pydicom's transforms once per stored value.
        domain, index, counts = distinct
        grey = _grey_levels(domain, ds, counts)[index]
    # MONOCHROME1 shows low values bright; Presentation LUT Shape INVERSE asks the same.
    # Either (or both, as DX files often say) means one inversion, never two.
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        grey = 255 - grey
    return grey


def _grey_levels(stored: np.ndarray, ds: Dataset, counts: np.ndarray | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, ds)
    probe = _voi_probe(ds)
    if probe is None:
        lo, hi = _robust_range(values, counts)
        return _window(np.asarray(values, dtype=np.float64), lo, hi)
    if probe.dtype.kind == "i":  # a VOI LUT indexes integers within its own domain
        values = np.clip(np.rint(values), probe[0], probe[-1]).astype(np.int64)
    # Map the VOI output's own range (what its lowest and highest input give) to 0..255.
    ends = apply_voi_lut(probe, ds, index=0)
    voi = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    return _window(voi, float(ends.min()), float(ends.max()))


def _voi_probe(ds: Dataset) -> np.ndarray | None:
    """Inputs spanning the VOI transform's domain (None: the file has no VOI)."""
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        # apply_voi_lut prefers the LUT when both a LUT and a window are present.
        entries = int(sequence[0].LUTDescriptor[0]) or 2**16
        first_mapped = int(sequence[0].LUTDescriptor[1])
        return np.arange(first_mapped, first_mapped + entries, dtype=np.int64)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter), abs(_first(ds.WindowWidth))
        return np.array([center - 50 * width - 1, center + 50 * width + 1], dtype=np.float64)
    return None


def _first(value: Any) -> float:
    """Window Center/Width may hold several views; the first is the default one."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def _dicom_colour(arr: np.ndarray, ds: Dataset, bits: int) -> Image.Image:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise UnsupportedImage(f"DICOM photometric interpretation {photometric} is not supported")
    rgb = arr[..., :3]
    if rgb.dtype != np.uint8:
        rgb = _window(rgb, 0.0, float(2**bits - 1))
    return Image.fromarray(np.ascontiguousarray(rgb))
