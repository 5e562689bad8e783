"""The Wuffs PNG path (images/png.py, the optional `fast-png` extra) gives exactly what
Pillow's path gives, steps aside for every PNG it does not handle, and leaves errors to
Pillow's wording. Each case decodes the same bytes both ways (png.ENABLED off and on)."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from raiox_cli import images
from raiox_cli.images import CorruptImage, png
from raiox_cli.training import synth

pytest.importorskip("pywuffs", reason="the optional fast-png extra is not installed")


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    png.ENABLED = True


def _save(img: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **options)
    return buf.getvalue()


def _both_ways(data: bytes) -> tuple[images.LoadedImage, images.LoadedImage]:
    png.ENABLED = False
    pillow = images.load_image(data)
    png.ENABLED = True
    return images.load_image(data), pillow


def _same(a: images.LoadedImage, b: images.LoadedImage) -> None:
    assert (a.image.mode, a.image.size, a.mode, a.bit_depth, a.warnings) == (
        b.image.mode,
        b.image.size,
        b.mode,
        b.bit_depth,
        b.warnings,
    )
    assert (a.width, a.height, a.sha256) == (b.width, b.height, b.sha256)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def _png(width: int, height: int, ihdr_tail: bytes, raw: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">II", width, height) + ihdr_tail
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _radiographs() -> list[bytes]:
    rng = np.random.default_rng(3)
    designs = synth.design_systems(2, seed=5)
    pictures = [
        synth.render_view(d, seed=i, query=False, size=(1000, 800)) for i, d in enumerate(designs)
    ]
    noise = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    twelve_bits = np.asarray(pictures[1]).astype(np.uint16) * 16 + rng.integers(0, 16, (800, 1000))
    return [
        *(_save(p, compress_level=1) for p in pictures),  # Paeth on almost every row
        _save(Image.fromarray(twelve_bits.astype(np.uint16))),  # 16-bit grey, windowed
        _save(pictures[0], optimize=True),
        _save(Image.fromarray(noise), compress_level=9),
        _save(Image.fromarray(noise).convert("L")),
        _save(Image.fromarray(noise[:1, :1])),  # one pixel
        _with_chunks(_save(Image.fromarray(noise)), b"gAMA", b"sBIT"),  # neither applied
    ]


def _with_chunks(data: bytes, *kinds: bytes) -> bytes:
    """`data` with ancillary chunks (gamma 1/2.2, 5 significant bits) after IHDR."""
    bodies = {b"gAMA": struct.pack(">I", 45455), b"sBIT": b"\x05\x05\x05"}
    extra = b"".join(
        struct.pack(">I", len(bodies[k]))
        + k
        + bodies[k]
        + struct.pack(">I", zlib.crc32(k + bodies[k]))
        for k in kinds
    )
    return data[:33] + extra + data[33:]


def test_wuffs_gives_pillows_pixels_for_grey_and_colour_radiographs() -> None:
    """8-bit grey (Paeth-filtered, optimised), 16-bit grey (windowed the same way
    after), RGB, one pixel: each decoded by Wuffs, each equal to Pillow's path."""
    for data in _radiographs():
        img = Image.open(io.BytesIO(data))
        assert png.decode(data, img) is not None  # the fast path took it
        fast, pillow = _both_ways(data)
        _same(fast, pillow)
        assert fast.format == "PNG" and fast.image.mode in ("L", "RGB")
    sixteen = images.load_image(_radiographs()[2])
    assert (sixteen.mode, sixteen.bit_depth, sixteen.image.mode) == ("I;16", 16, "L")


def test_pngs_beyond_plain_pixels_go_through_pillow() -> None:
    grey = Image.fromarray(np.arange(60 * 40, dtype=np.uint32).reshape(40, 60).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise: Pillow's path applies it
    adam7 = _png(1, 1, bytes([8, 0, 0, 0, 1]), b"\x00\x80")  # interlaced, pass 1 only
    cases = {
        "transparency": _save(grey, transparency=0),
        "exif": _save(grey, exif=exif),
        "animation": _save(grey, save_all=True, append_images=[grey.rotate(90)]),
        "16-bit with transparency": _save(
            Image.fromarray(np.full((40, 60), 4000, np.uint16)), transparency=4000
        ),
        "palette": _save(grey.convert("P")),
        "grey+alpha": _save(grey.convert("LA")),
        "interlaced": adam7,
    }
    for name, data in cases.items():
        assert png.decode(data, Image.open(io.BytesIO(data))) is None, name
        fast, pillow = _both_ways(data)
        _same(fast, pillow)
    assert _both_ways(cases["exif"])[0].image.size == (40, 60)  # rotated
    assert _both_ways(cases["animation"])[0].warnings == ("2 frames/pages: used the first",)


def test_damaged_pngs_are_refused_in_pillows_words() -> None:
    data = _radiographs()[0]
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    bad_checksum = bytearray(data)
    bad_checksum[end - 5] ^= 1  # the zlib stream's adler32 (last IDAT byte before its CRC)
    truncated = data[: len(data) // 2]
    bad_deflate = bytearray(data)
    bad_deflate[200] ^= 0x55
    for damaged in (bytes(bad_checksum), truncated, bytes(bad_deflate)):
        messages = []
        for enabled in (False, True):
            png.ENABLED = enabled
            with pytest.raises(CorruptImage) as caught:
                images.load_image(damaged)
            messages.append(str(caught.value))
        assert messages[0] == messages[1]


def test_threads_share_the_module_each_with_its_own_decoder() -> None:
    datas = _radiographs() * 3
    png.ENABLED = False
    expected = [np.asarray(images.load_image(d).image) for d in datas]
    png.ENABLED = True
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda d: np.asarray(images.load_image(d).image), datas))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
