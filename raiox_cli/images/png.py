"""The common PNG radiograph (8- or 16-bit grey or 8-bit RGB, one frame, no
transparency, no EXIF) decoded by Wuffs when the optional `pywuffs` is installed (`pip install
'raiox[fast-png]'`): the same pixels as Pillow for about 0.7 of its CPU on a 1000x800
grey X-ray (8-bit; 16-bit likewise) (bench/README.md, "Where the CPU outside the model goes").

Wuffs is Google's decoder library written in a memory-safe language for hostile input.
Pillow still reads the header first (its chunk checks, the pixel cap), and any PNG this
path does not take, or that Wuffs refuses, goes through Pillow as before, so errors keep
their wording. Checksums are verified (Wuffs' own default skips them; Pillow refuses a
bad zlib checksum, and so does this path).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
from PIL import Image

try:
    from pywuffs import ImageDecoderQuirks, ImageDecoderType, PixelFormat, aux
except ImportError:  # the optional extra is not installed: Pillow decodes every PNG
    aux = None

# Off: every PNG through Pillow (the benchmark compares both in one run).
ENABLED = aux is not None
# Chunks after which Pillow's result would differ from the bare pixels: EXIF (orientation
# applied by Pillow's path), APNG's animation control (frames counted there).
_PILLOW_ONLY = (b"eXIf", b"acTL")
_local = threading.local()  # Wuffs decoders are not thread-safe: one per thread and mode


def available() -> bool:
    return ENABLED and aux is not None


# Pillow's modes this path decodes to the same numbers, and Wuffs' pixel format for each.
_FORMATS = {"L": "Y", "RGB": "RGB", "I;16": "Y_16LE"}


def decode(data: bytes, img: Image.Image) -> np.ndarray | None:
    """The pixels of `img` (Pillow's opened, not loaded, PNG of `data`) decoded by
    Wuffs, as `np.asarray` of Pillow's image would give them (uint8 (h, w) for "L",
    (h, w, 3) for "RGB", uint16 (h, w) for "I;16"); None when Pillow should decode it
    (not installed, another mode, transparency, interlaced, EXIF, animation, or
    anything Wuffs refuses)."""
    if not available() or img.mode not in _FORMATS or img.has_transparency_data:
        return None
    if img.info.get("interlace") or not _plain_chunks(data):
        return None
    width, height = img.size
    result = _decoder(img.mode).decode(data)
    if result.error_message or result.pixcfg.width() != width or result.pixcfg.height() != height:
        return None
    pixels = np.asarray(result.pixbuf)
    if img.mode == "I;16":
        pixels = pixels.view("<u2")
    shape = (height, width, 3) if img.mode == "RGB" else (height, width)
    if pixels.size != math.prod(shape):
        return None
    return pixels.reshape(shape)


def _decoder(mode: str) -> Any:
    """This thread's Wuffs decoder to `mode`'s pixels. Its buffer comes from the same
    IHDR whose pixel count the caller has checked against the cap."""
    decoders = getattr(_local, "decoders", None)
    if decoders is None:
        decoders = _local.decoders = {}
    if mode not in decoders:
        config = aux.ImageDecoderConfig()
        config.enabled_decoders = [ImageDecoderType.PNG]
        config.pixel_format = getattr(PixelFormat, _FORMATS[mode])
        config.quirks = {ImageDecoderQuirks.IGNORE_CHECKSUM: 0}
        decoders[mode] = aux.ImageDecoder(config)
    return decoders[mode]


def _plain_chunks(data: bytes) -> bool:
    """No chunk that Pillow's path handles beyond the pixels (read from the chunk
    headers alone); False also when a chunk runs past the end (Pillow says why)."""
    at, end = 8, len(data)
    while at + 8 <= end:
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        if kind in _PILLOW_ONLY:
            return False
        if kind == b"IEND":
            return True
        at += 12 + length
    return False
