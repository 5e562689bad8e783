"""DICOM through pydicom: rescale (modality LUT), VOI LUT or window, MONOCHROME1 inverted
once; compressed transfer syntaxes need the optional decoders."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raiox_cli.images.base import (
    COMPRESSED_DICOM_HINT,
    SUPPORTED,
    CorruptImage,
    Decoded,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    describe,
    one_line,
    pixels_message,
)
from raiox_cli.images.levels import distinct_levels, grey_image, robust_range, window

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def decode_dicom(data: bytes, max_pixels: int) -> Decoded:
    """pydicom parses lazily, so damage can surface at any element access: every
    exception past this boundary is the file's fault and becomes one ImageError."""
    import pydicom

    preamble = data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not preamble)
    except Exception as exc:
        if not preamble:
            raise UnsupportedImage(
                f"not a supported image: looks like {describe(data)} (supported: {SUPPORTED})"
            ) from exc
        raise CorruptImage(f"cannot read DICOM: {one_line(exc)}") from exc
    try:
        return _dicom_pixels(ds, preamble, data, max_pixels)
    except ImageError:
        raise
    except MemoryError:
        raise ImageTooLarge("out of memory decoding this DICOM") from None
    except Exception as exc:
        hint = _hint(ds)
        error = UnsupportedImage if hint else CorruptImage  # a decoder's gap, not bad bytes
        raise error(f"cannot decode DICOM: {one_line(exc)}{hint}") from exc


def _dicom_pixels(ds: Dataset, preamble: bool, data: bytes, max_pixels: int) -> Decoded:
    if preamble and len(ds) == 0 and not getattr(ds, "file_meta", None):
        raise CorruptImage("DICOM file has no readable elements after its DICM marker")
    if "PixelData" not in ds or not ds.get("Rows") or not ds.get("Columns"):
        if not preamble and len(ds) < 2:  # forced read of something that only resembled DICOM
            raise UnsupportedImage(
                f"not a supported image: looks like {describe(data)} (supported: {SUPPORTED})"
            )
        raise UnsupportedImage(
            "DICOM file holds no image (no Pixel Data, Rows or Columns): a report, or truncated"
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns > max_pixels:
        raise ImageTooLarge(pixels_message(columns, rows, max_pixels))
    frames = int(ds.get("NumberOfFrames") or 1)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    _set_transfer_syntax(ds)
    _require_decoder(ds)
    arr = _first_frame(ds)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        rgb = grey_image(_dicom_grey(arr, ds, photometric))
    else:
        rgb = _dicom_colour(arr, ds, bits)
    notes = (f"multi-frame DICOM ({frames} frames): used the first",) if frames > 1 else ()
    return Decoded(rgb, photometric, bits, notes)


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
    distinct = distinct_levels(arr)
    if distinct is None:
        grey = _grey_levels(arr, ds, None)
    else:
        # Every step is per pixel: run pydicom's transforms once per stored value.
        grey = distinct.map(_grey_levels(distinct.domain, ds, distinct.counts))
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
        lo, hi = robust_range(values, counts)
        return window(np.asarray(values, dtype=np.float64), lo, hi)
    if probe.dtype.kind == "i":  # a VOI LUT indexes integers within its own domain
        values = np.clip(np.rint(values), probe[0], probe[-1]).astype(np.int64)
    # Map the VOI output's own range (what its lowest and highest input give) to 0..255.
    ends = apply_voi_lut(probe, ds, index=0)
    voi = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    return window(voi, float(ends.min()), float(ends.max()))


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
        rgb = window(rgb, 0.0, float(2**bits - 1))
    return Image.fromarray(np.ascontiguousarray(rgb))
