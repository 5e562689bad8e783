"""The one image loader: formats, bit depths, DICOM grey pipeline, hostile files, crops.

Fixtures are generated here (Pillow, pydicom), plus pydicom's bundled test files
where they fit; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from raiox_cli import images
from raiox_cli.errors import UsageError
from raiox_cli.images import (
    BadCrop,
    CorruptImage,
    Crop,
    CropOutsideImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    load_image,
    parse_crop,
    sniff_format,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


# --- fixtures -----------------------------------------------------------------------


def _phantom(levels: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
    """A small radiograph: dark soft tissue, grey bone band, a bright implant post.
    `levels` are the three region values (dark, bone, implant)."""
    img = np.full((64, 96), levels[0], dtype=np.int64)
    img[16:56, :] = levels[1]
    img[8:48, 40:56] = levels[2]
    return img


IMPLANT = (slice(8, 48), slice(40, 56))
BONE = (slice(50, 56), slice(0, 30))


def _grey(loaded: images.LoadedImage) -> np.ndarray:
    """Grey sources come back as one 8-bit channel ("L"); colour ones as RGB."""
    arr = np.asarray(loaded.image)
    assert arr.dtype == np.uint8
    if arr.ndim == 2:
        assert loaded.image.mode == "L"
        return arr.astype(int)
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _dicom(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    preamble: bool = True,
    **elements,
) -> bytes:
    """An uncompressed DX DICOM file holding `stored` (rows, cols) or (frames, rows, cols)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = stored if stored.ndim == 3 else stored[None]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = frames.astype("<u2").tobytes()
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(buf, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def _bundled(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(path)


def _jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    noisy = (rng.random((96, 128)) * 255).astype(np.uint8)  # noise: no early end of data
    return _save(Image.fromarray(noisy), "JPEG", quality=90)


# --- 8-bit and 16-bit raster formats -------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "WEBP", "JPEG"])
def test_8bit_gradient_loads_monotonic(fmt: str) -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    data = _save(Image.fromarray(ramp), fmt, **kwargs)
    loaded = load_image(data)
    assert loaded.format == fmt
    assert (loaded.width, loaded.height) == (256, 8)
    row = _grey(loaded)[4] if fmt != "WEBP" else np.asarray(loaded.image)[4].mean(axis=1)
    tolerance = 3 if fmt == "JPEG" else 0
    assert np.all(np.diff(row) >= -tolerance)
    assert abs(int(row[0]) - 0) <= tolerance and abs(int(row[-1]) - 255) <= tolerance
    assert loaded.sha256 == __import__("hashlib").sha256(data).hexdigest()
    assert loaded.size_bytes == len(data) and loaded.bit_depth == 8 and loaded.crop_box is None


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gradient_is_windowed_not_clipped_or_wrapped(fmt: str) -> None:
    # A 12-bit sensor's ramp in a 16-bit container: convert("L") would clip it all to
    # 255, astype(uint8) would wrap it into a saw-tooth.
    ramp = np.tile(np.linspace(300, 4000, 512).astype(np.uint16), (8, 1))
    data = _save(Image.fromarray(ramp), fmt)
    loaded = load_image(data)
    assert loaded.mode.startswith("I;16") and loaded.bit_depth == 16
    row = _grey(loaded)[3]
    assert np.all(np.diff(row) >= 0), "not monotonic: wrapped"
    assert row[0] <= 2 and row[-1] >= 253, "not stretched to the 8-bit range"
    assert len(np.unique(row)) > 200, "clipped into a few levels"


def test_16bit_big_endian_tiff() -> None:
    ramp = np.tile(np.linspace(0, 60000, 300).astype(">u2"), (4, 1))
    img = Image.frombytes("I;16B", (300, 4), ramp.tobytes())
    loaded = load_image(_save(img, "TIFF"))
    row = _grey(loaded)[0]
    assert np.all(np.diff(row) >= 0) and row[-1] >= 253


@pytest.mark.parametrize(
    "mode",
    ["1", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I", "F"],
)
def test_every_mode_becomes_8bit_grey_or_rgb(mode: str) -> None:
    base = Image.fromarray((_phantom((20, 120, 240))).astype(np.uint8))
    img = base.convert(mode.split("+")[0])
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
    kwargs = {"transparency": 0} if "transparency" in mode else {}
    loaded = load_image(_save(img, fmt, **kwargs))
    arr = np.asarray(loaded.image)
    grey_source = mode in ("1", "L", "P", "I", "F")  # the phantom's palette is grey
    assert loaded.image.mode == ("L" if grey_source else "RGB")
    assert arr.shape[:2] == (64, 96)
    assert arr[IMPLANT].mean() > arr[BONE].mean()


def test_same_content_looks_the_same_in_every_format() -> None:
    """8-bit PNG, 16-bit PNG and TIFF, DICOM MONOCHROME1 and 2: one picture."""
    levels8 = (10, 110, 245)
    reference = _grey(load_image(_save(Image.fromarray(_phantom(levels8).astype(np.uint8)), "PNG")))
    assert np.array_equal(reference, _phantom(levels8))
    # High-bit-depth files are windowed to their own range: darkest 0, brightest 255.
    stretched = (reference - 10) * 255 / 235
    levels16 = tuple(v * 257 for v in levels8)
    stored12 = _phantom(tuple(v * 16 for v in levels8))
    variants = {
        "PNG16": _save(Image.fromarray(_phantom(levels16).astype(np.uint16)), "PNG"),
        "TIFF16": _save(Image.fromarray(_phantom(levels16).astype(np.uint16)), "TIFF"),
        "MONO2": _dicom(stored12),
        "MONO1": _dicom(4095 - stored12, photometric="MONOCHROME1"),
    }
    for name, data in variants.items():
        assert np.abs(_grey(load_image(data)) - stretched).max() <= 1, name


def test_exif_orientation_applied_before_crop() -> None:
    stored = np.zeros((32, 64), dtype=np.uint8)
    stored[:, :32] = 255  # left half white as stored
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _save(img, "JPEG", exif=exif, quality=95)
    loaded = load_image(data)
    assert (loaded.width, loaded.height) == (32, 64)
    grey = _grey(loaded)
    assert grey[:28].mean() > 240 and grey[36:].mean() < 15  # stored left is now the top
    top = load_image(data, crop=parse_crop("0,0,32,30"))
    assert top.crop_box == (0, 0, 32, 30) and top.image.size == (32, 30)
    assert _grey(top).mean() > 240
    bottom = load_image(data, crop=parse_crop("0,0.5,1.0,0.5"))
    assert bottom.crop_box == (0, 32, 32, 32) and _grey(bottom)[4:].mean() < 15


# --- DICOM --------------------------------------------------------------------------


def test_dicom_polarity_implant_bright_in_both_interpretations() -> None:
    # Dense metal attenuates most: MONOCHROME2 stores it high, MONOCHROME1 low.
    stored = _phantom((200, 1500, 3900))
    cases = {
        "MONOCHROME2": _dicom(stored),
        "MONOCHROME1": _dicom(4095 - stored, photometric="MONOCHROME1"),
        # DX files often say MONOCHROME1 *and* INVERSE: still one inversion.
        "MONOCHROME1+INVERSE": _dicom(
            4095 - stored, photometric="MONOCHROME1", PresentationLUTShape="INVERSE"
        ),
        "MONOCHROME2+INVERSE": _dicom(4095 - stored, PresentationLUTShape="INVERSE"),
        "MONOCHROME2+IDENTITY": _dicom(stored, PresentationLUTShape="IDENTITY"),
    }
    outputs = {}
    for name, data in cases.items():
        loaded = load_image(data)
        assert loaded.format == "DICOM" and loaded.bit_depth == 12
        grey = _grey(loaded)
        assert grey[IMPLANT].mean() > grey[BONE].mean() + 100 > grey[0:8, 0:8].mean() + 100, name
        outputs[name] = grey
    first = outputs["MONOCHROME2"]
    for name, grey in outputs.items():
        assert np.abs(grey - first).max() <= 1, name


def test_dicom_rescale_then_window() -> None:
    # Stored 0..4095, rescaled to -1024..3071 (CT-like); window 0 +- 200 in rescaled units.
    stored = np.tile(np.arange(0, 4096, 8, dtype=np.int64), (4, 1))
    data = _dicom(
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=0,
        WindowWidth=400,
    )
    row = _grey(load_image(data))[0]
    rescaled = stored[0] - 1024
    assert np.all(np.diff(row) >= 0)
    assert (row[rescaled < -200] == 0).all() and (row[rescaled > 200] == 255).all()
    middle = row[np.argmin(np.abs(rescaled))]
    assert 120 <= middle <= 135


def test_dicom_rescale_slope_changes_the_window_position() -> None:
    stored = np.tile(np.arange(0, 4096, 8, dtype=np.int64), (4, 1))
    plain = _grey(load_image(_dicom(stored, WindowCenter=1000, WindowWidth=200)))[0]
    doubled = _grey(
        load_image(
            _dicom(stored, RescaleSlope=2, RescaleIntercept=0, WindowCenter=1000, WindowWidth=200)
        )
    )[0]
    # With slope 2 the window centre 1000 sits at stored 500, not 1000.
    assert stored[0][np.argmax(plain >= 128)] == pytest.approx(1000, abs=16)
    assert stored[0][np.argmax(doubled >= 128)] == pytest.approx(500, abs=16)


def test_dicom_first_of_several_windows() -> None:
    stored = np.tile(np.arange(0, 4096, 8, dtype=np.int64), (4, 1))
    several = _dicom(stored, WindowCenter=[800, 3000], WindowWidth=[400, 100])
    first_only = _dicom(stored, WindowCenter=800, WindowWidth=400)
    assert np.array_equal(_grey(load_image(several)), _grey(load_image(first_only)))


def test_dicom_voi_lut_preferred_over_window() -> None:
    stored = np.tile(np.arange(0, 4096, 8, dtype=np.int64), (4, 1))
    lut_item = Dataset()
    lut_item.LUTDescriptor = [4096, 0, 12]
    lut_item.LUTData = np.minimum(np.arange(4096) * 2, 4095).astype(np.uint16).tolist()
    lut_item["LUTDescriptor"].VR = "US"
    lut_item["LUTData"].VR = "US"
    data = _dicom(stored, VOILUTSequence=[lut_item], WindowCenter=3000, WindowWidth=10)
    row = _grey(load_image(data))[0]
    assert np.all(np.diff(row) >= 0)
    assert (row[stored[0] >= 2048] == 255).all()  # the LUT saturates at half range
    assert 120 <= row[np.searchsorted(stored[0], 1024)] <= 135  # not the 3000/10 window


def test_dicom_12_bits_in_16_without_window_ignores_high_bits() -> None:
    ramp = np.tile(np.linspace(100, 4000, 256).astype(np.int64), (4, 1))
    overlay = ramp | 0xF000  # bits above High Bit may carry overlay/garbage
    clean = _grey(load_image(_dicom(ramp)))
    noisy = _grey(load_image(_dicom(overlay)))
    assert np.array_equal(clean, noisy)
    assert np.all(np.diff(clean[0]) >= 0) and clean[0, 0] <= 2 and clean[0, -1] >= 253


def test_dicom_multi_frame_uses_first_frame_and_warns() -> None:
    frames = np.stack([_phantom((100, 1500, 4000)), np.zeros((64, 96)), np.full((64, 96), 999)])
    loaded = load_image(_dicom(frames))
    assert loaded.warnings == ("multi-frame DICOM (3 frames): used the first",)
    grey = _grey(loaded)
    assert grey[IMPLANT].mean() == 255 and grey[0:8, 0:8].mean() == 0


def test_dicom_without_preamble() -> None:
    data = _dicom(_phantom((100, 1500, 4000)), preamble=False)
    assert data[128:132] != b"DICM"
    assert sniff_format(data) == "DICOM"
    grey = _grey(load_image(data))
    assert grey[IMPLANT].mean() == 255


def test_dicom_header_over_pixel_limit_refused_before_decoding() -> None:
    data = _dicom(_phantom((100, 1500, 4000)))
    with pytest.raises(ImageTooLarge, match=r"96x64 = 6144 pixels is over the 6000-pixel limit"):
        load_image(data, max_pixels=6000)


def test_dicom_crop() -> None:
    loaded = load_image(_dicom(_phantom((100, 1500, 4000))), crop=parse_crop("40,8,16,40"))
    assert loaded.crop_box == (40, 8, 16, 40) and (loaded.width, loaded.height) == (96, 64)
    assert _grey(loaded).min() == 255  # only the implant


# pydicom's bundled files: real-world encodings of the same pictures.


def test_bundled_dicom_encodings_decode_identically() -> None:
    native = _grey(load_image(_bundled("MR_small.dcm")))
    for name in ("MR_small_RLE.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(_grey(load_image(_bundled(name))), native), name
    assert native.std() > 20


def test_bundled_ct_signed_with_rescale() -> None:
    loaded = load_image(_bundled("CT_small.dcm"))
    assert loaded.mode == "MONOCHROME2" and (loaded.width, loaded.height) == (128, 128)
    assert _grey(loaded).std() > 20


def test_bundled_colour_multiframe() -> None:
    loaded = load_image(_bundled("SC_rgb_rle_2frame.dcm"))
    assert loaded.mode == "RGB" and "2 frames" in loaded.warnings[0]
    assert len(np.unique(np.asarray(loaded.image).reshape(-1, 3), axis=0)) > 3


def test_bundled_truncated_dicom_is_corrupt() -> None:
    with pytest.raises(CorruptImage, match="less than expected"):
        load_image(_bundled("MR_truncated.dcm"))


def test_bundled_dicom_without_pixels() -> None:
    with pytest.raises(UnsupportedImage, match="no image"):
        load_image(_bundled("rtplan.dcm"))


def test_compressed_dicom_without_decoder_names_the_extra() -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    path = _bundled("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(JPEGLSLossless).is_available:
        assert _grey(load_image(path)).std() > 20
        return
    with pytest.raises(UnsupportedImage) as caught:
        load_image(path)
    assert "pip install 'raiox[dicom-compressed]'" in str(caught.value)
    assert "JPEG-LS" in str(caught.value)


# --- hostile and broken files ---------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def test_png_bomb_header_refused_without_allocating() -> None:
    data = _png_header_only(50_000, 50_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as caught:
            load_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024  # 2.5 G pixels were never allocated
    message = str(caught.value)
    assert "2500000000 pixels" in message and "80000000-pixel limit" in message


def test_pixel_limit_from_header_names_size_and_limit() -> None:
    with pytest.raises(ImageTooLarge) as caught:
        load_image(_png_header_only(2000, 1000), max_pixels=1_000_000)
    assert str(caught.value) == (
        "2000x1000 = 2000000 pixels is over the 1000000-pixel limit (RAIOX_MAX_PIXELS)"
    )


def test_byte_limit(tmp_path: Path) -> None:
    data = _jpeg_bytes()
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    limit = len(data) - 1
    for source in (path, data):
        with pytest.raises(ImageTooLarge, match=f"{len(data)} bytes is over the {limit}-byte"):
            load_image(source, max_bytes=limit)
    assert load_image(path, max_bytes=len(data)).format == "JPEG"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_truncated_files_are_corrupt(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    noisy = Image.fromarray((rng.random((96, 128)) * 255).astype(np.uint8))
    data = _save(noisy, fmt)
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(CorruptImage, match=f"cannot decode {fmt}"):
        load_image(cut)
    # Even when something in the process has switched Pillow's leniency on.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(CorruptImage):
        load_image(cut)


def test_truncated_jpeg_mentions_truncation() -> None:
    data = _jpeg_bytes()
    with pytest.raises(CorruptImage, match="truncated"):
        load_image(data[: len(data) // 2])


def test_pillow_stays_strict_after_importing_raiox() -> None:
    import raiox_cli.cli
    import raiox_cli.embedding  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_named_jpg_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "xray.jpg"
    path.write_text("patient: 123\nthis is not a radiograph\n")
    with pytest.raises(UnsupportedImage, match="looks like text"):
        load_image(path)


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(EmptyImage, match="0 bytes"):
        load_image(path)


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (b"GIF89a" + b"\x00" * 40, "GIF"),
        (b"%PDF-1.7\n" + b"\x00" * 40, "PDF"),
        (b"<html><body>404</body></html>", "HTML"),
        (bytes(range(256)) * 2, "binary"),
    ],
)
def test_other_types_named_in_the_refusal(data: bytes, label: str) -> None:
    with pytest.raises(UnsupportedImage, match=label):
        load_image(data)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_garbage_after_magic_is_corrupt() -> None:
    with pytest.raises(CorruptImage):
        load_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(CorruptImage):
        load_image(b"\x00" * 128 + b"DICM" + b"\xff" * 50)


def test_every_refusal_is_one_line() -> None:
    data = _jpeg_bytes()
    cases = [
        b"",
        b"hello",
        data[:300],
        _png_header_only(50_000, 50_000),
        b"\x00" * 128 + b"DICM" + b"\xff" * 50,
    ]
    for case in cases:
        with pytest.raises(ImageError) as caught:
            load_image(case)
        assert "\n" not in str(caught.value) and str(caught.value)


# --- crop boxes -------------------------------------------------------------------


def test_parse_crop_pixels_and_fractions() -> None:
    assert parse_crop("10,20,300,200") == Crop(10, 20, 300, 200)
    assert parse_crop(" 0.5, 0 ,0.5,1.0") == Crop(0.5, 0.0, 0.5, 1.0, fractional=True)
    assert parse_crop("0,0,1.0,1.0").box(640, 480) == (0, 0, 640, 480)
    assert parse_crop("0.25,0.25,0.5,0.5").box(100, 80) == (25, 20, 50, 40)
    assert parse_crop("10,20,30,40").box(40, 60) == (10, 20, 30, 40)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1,2,3",
        "1,2,3,4,5",
        "a,b,c,d",
        "10,10,0,5",
        "-1,0,10,10",
        "0.5,0.5,0.6,0.2",
        "10,10,0.5,0.5",
        "0.1,0.1,nan,0.2",
        "1,,2,3",
    ],
)
def test_parse_crop_rejects_bad_strings(text: str) -> None:
    with pytest.raises(BadCrop) as caught:
        parse_crop(text)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2
    assert "x,y" in str(caught.value) or "fractions" in str(caught.value)


def test_crop_outside_image_is_an_image_error() -> None:
    data = _save(Image.fromarray(np.zeros((50, 60), dtype=np.uint8)), "PNG")
    with pytest.raises(CropOutsideImage, match="outside the 60x50 image"):
        load_image(data, crop=parse_crop("50,0,20,10"))
    assert issubclass(CropOutsideImage, ImageError)


# --- concurrency -------------------------------------------------------------------


def test_thread_safe_results_match_sequential() -> None:
    ramp16 = np.tile(np.linspace(300, 4000, 128).astype(np.uint16), (16, 1))
    sources = [
        _jpeg_bytes(),
        _save(Image.fromarray(ramp16), "PNG"),
        _save(Image.fromarray(ramp16), "TIFF"),
        _dicom(_phantom((100, 1500, 4000)), photometric="MONOCHROME1"),
        _dicom(_phantom((100, 1500, 4000)), WindowCenter=2000, WindowWidth=1000),
    ] * 4
    sequential = [np.asarray(load_image(s).image) for s in sources]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda s: np.asarray(load_image(s).image), sources))
    assert all(np.array_equal(a, b) for a, b in zip(sequential, parallel, strict=True))


# --- the CLI ---------------------------------------------------------------------------


def test_embed_accepts_dicom_and_crop(raiox_env, tmp_path: Path) -> None:
    from raiox_cli.cli import app

    runner = CliRunner()
    dcm = tmp_path / "xray.dcm"
    dcm.write_bytes(_dicom(_phantom((100, 1500, 4000)), photometric="MONOCHROME1"))
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(dcm.read_bytes()[:400])
    result = runner.invoke(app, ["embed", str(dcm), str(bad)])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(dcm)]
    assert f"{bad}: " in result.stderr

    whole = np.array(lines[0]["embedding"])
    cropped = runner.invoke(app, ["embed", str(dcm), "--crop", "0.4,0.1,0.2,0.6"])
    assert cropped.exit_code == 0, cropped.output
    region = np.array(json.loads(cropped.stdout)["embedding"])
    assert region.shape == whole.shape and not np.allclose(region, whole)

    outside = runner.invoke(app, ["embed", str(dcm), "--crop", "90,0,50,50"])
    assert outside.exit_code == 1 and "outside the 96x64 image" in outside.stderr
    malformed = runner.invoke(app, ["embed", str(dcm), "--crop", "1,2,3"])
    assert malformed.exit_code == 2 and "x,y,w,h" in malformed.stderr


def test_dicom_reads_back_with_pydicom() -> None:
    """The fixture writer produces files pydicom itself accepts (guards the tests above)."""
    ds = pydicom.dcmread(io.BytesIO(_dicom(_phantom(), photometric="MONOCHROME1")))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Rows == 64


def test_multi_page_tiff_uses_first_page_and_warns() -> None:
    pages = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (200, 10)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    loaded = load_image(buf.getvalue())
    assert loaded.warnings == ("2 frames/pages: used the first",)
    assert _grey(loaded).min() == 200


def test_damaged_files_never_escape_as_other_exceptions() -> None:
    """Random truncations and byte flips of every format: a result or an ImageError."""
    rng = np.random.default_rng(7)
    small = Image.fromarray(_phantom((20, 120, 240)).astype(np.uint8))
    originals = [
        _save(small, "JPEG"),
        _save(small, "PNG"),
        _save(small, "BMP"),
        _save(small, "WEBP"),
        _save(Image.fromarray(_phantom((300, 9000, 60000)).astype(np.uint16)), "TIFF"),
        _dicom(_phantom((100, 1500, 4000)), WindowCenter=2000, WindowWidth=1000),
        _dicom(_phantom((100, 1500, 4000)), preamble=False),
    ]
    outcomes = {"loaded": 0, "refused": 0}
    for original in originals:
        for _ in range(25):
            data = bytearray(original)
            if rng.random() < 0.5:
                data = data[: int(rng.integers(1, len(data)))]
            else:
                for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                    data[position] = int(rng.integers(0, 256))
            try:
                load_image(bytes(data))
                outcomes["loaded"] += 1
            except ImageError as exc:
                assert "\n" not in str(exc)
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0
