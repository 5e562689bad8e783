"""De-identification of what is stored: DICOM (PS3.15 Annex E basic profile via
dicognito + the profile's Z/X actions), EXIF and text chunks out of JPEG/PNG, and
the stored copy decoding to exactly the pixels the embedding was computed from."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin

from raiox_cli import config, db, images
from raiox_cli.clinics import privacy
from raiox_cli.store import objects as storage
from tests.helpers.privacy import PATIENT, dicom_with_patient, exif_with_camera, pixels


def test_dicom_loses_every_identifier_and_keeps_its_pixels() -> None:
    original = dicom_with_patient()
    clean = privacy.deidentify_dicom(original, seed="s1")
    for value in PATIENT.values():
        assert value.encode() in original
        assert value.encode() not in clean and value.split("^")[0].encode() not in clean
    ds = pydicom.dcmread(io.BytesIO(clean))
    before = pydicom.dcmread(io.BytesIO(original))
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == ("", "", "")
    assert "InstitutionName" not in ds and ds.DeidentificationMethod
    assert ds.StudyInstanceUID != before.StudyInstanceUID  # UIDs replaced...
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID  # ...consistently
    assert ds.StudyDate != before.StudyDate  # dates shifted
    assert ds.PixelData == before.PixelData
    assert np.array_equal(pixels(clean), pixels(original))
    assert not any(e.tag.is_private for e in ds)


def test_same_secret_same_replacements_other_secret_other_uids() -> None:
    original = dicom_with_patient()
    first = privacy.deidentify_dicom(original, seed="s1")
    assert privacy.deidentify_dicom(original, seed="s1") == first  # one object in the store
    other = pydicom.dcmread(io.BytesIO(privacy.deidentify_dicom(original, seed="s2")))
    assert other.StudyInstanceUID != pydicom.dcmread(io.BytesIO(first)).StudyInstanceUID


def test_burned_in_annotation_is_refused() -> None:
    with pytest.raises(privacy.BurnedInAnnotation, match="burned-in"):
        privacy.deidentify_dicom(dicom_with_patient(BurnedInAnnotation="YES"), seed="s")
    clean = privacy.deidentify_dicom(dicom_with_patient(BurnedInAnnotation="NO"), seed="s")
    assert pydicom.dcmread(io.BytesIO(clean)).PatientIdentityRemoved == "YES"


def test_private_tags_and_overlays_go() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_with_patient()))
    block = ds.private_block(0x0009, "ACME clinic", create=True)
    block.add_new(0x01, "LO", "private patient note")
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # overlay data
    out = io.BytesIO()
    ds.save_as(out)
    clean = privacy.deidentify_dicom(out.getvalue(), seed="s")
    assert b"private patient note" not in clean
    assert 0x60003000 not in pydicom.dcmread(io.BytesIO(clean))


def _grey(seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 80)) * 255).astype("uint8"))


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_exif_and_comments_removed_pixels_and_orientation_kept(orientation: int) -> None:
    out = io.BytesIO()
    _grey().save(out, "JPEG", exif=exif_with_camera(orientation), comment=b"patient Ana Souza")
    original = out.getvalue()
    clean = privacy.strip_jpeg(original)
    for text in (b"CameraCo", b"Dr. Artist", b"2024:01:02", b"Ana Souza"):
        assert text in original and text not in clean
    assert privacy.orientation_exif(clean) == orientation
    assert np.array_equal(pixels(clean), pixels(original))
    assert clean[clean.index(b"\xff\xda") :] == original[original.index(b"\xff\xda") :]


def test_png_text_chunks_and_exif_removed_pixels_kept() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Ana Souza")
    info.add_itxt("Comment", "paciente Ana", zip=True)
    out = io.BytesIO()
    _grey().save(out, "PNG", pnginfo=info, exif=exif_with_camera(8))
    original = out.getvalue()
    clean = privacy.strip_png(original)
    assert b"Ana Souza" in original and b"tEXt" in original and b"iTXt" in original
    for chunk in (b"tEXt", b"zTXt", b"iTXt", b"CameraCo", b"Ana Souza"):
        assert chunk not in clean
    assert privacy.orientation_exif(clean) == 8
    assert np.array_equal(pixels(clean), pixels(original))


def _tagged_tiff(image: Image.Image, *, pages: int = 1, **options: object) -> bytes:
    """A TIFF as a dental sensor's export might carry it: the patient in the
    description, the operator as artist, the chart as document name, ids in private
    tags, EXIF orientation 6; further pages carry their own text."""
    from PIL import TiffImagePlugin

    def tags(page: int) -> TiffImagePlugin.ImageFileDirectory_v2:
        ifd = TiffImagePlugin.ImageFileDirectory_v2()
        ifd[270] = f"Paciente Ana Souza PAC-12345 page {page}"  # ImageDescription
        ifd[315] = "Dr. Artist"  # Artist
        ifd[269] = "prontuario-19800101"  # DocumentName
        ifd[305] = "SensorSoft 9"  # Software
        ifd[274] = 6  # Orientation
        ifd[65000] = "private PAC-12345"  # a vendor's private tag
        ifd.tagtype[65000] = 2
        return ifd

    out = io.BytesIO()
    extra = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for _ in range(pages - 1)]
    for page, frame in enumerate(extra, start=2):
        frame.encoderinfo = {"tiffinfo": tags(page)}
    image.save(out, "TIFF", tiffinfo=tags(1), save_all=pages > 1, append_images=extra, **options)
    return out.getvalue()


def _image_data(data: bytes) -> bytes:
    """A TIFF's strips (or tiles), in order, as stored in the file."""
    with Image.open(io.BytesIO(data)) as img:
        tags = img.tag_v2
        offsets, counts = (324, 325) if 324 in tags else (273, 279)
        return b"".join(data[o : o + n] for o, n in zip(tags[offsets], tags[counts], strict=True))


IDENTIFYING = (b"Ana Souza", b"PAC-12345", b"Dr. Artist", b"prontuario", b"SensorSoft")


@pytest.mark.parametrize(
    ("mode", "compression"),
    [("L", None), ("L", "tiff_lzw"), ("I;16", "tiff_adobe_deflate"), ("RGB", "jpeg")],
)
def test_tiff_keeps_only_the_tags_a_decoder_needs(mode: str, compression: str | None) -> None:
    image = (
        _grey().convert(mode)
        if mode != "I;16"
        else Image.fromarray((np.random.default_rng(3).random((64, 80)) * 65535).astype("uint16"))
    )
    options = {"compression": compression} if compression else {}
    original = _tagged_tiff(image, **options)
    clean = privacy.strip_tiff(original)
    for text in IDENTIFYING:
        assert text in original and text not in clean
    with Image.open(io.BytesIO(clean)) as img:
        assert 65000 not in img.tag_v2 and 270 not in img.tag_v2 and 315 not in img.tag_v2
        assert img.tag_v2[274] == 6  # orientation kept: it decodes the same way up
    assert _image_data(clean) == _image_data(original)  # strips byte for byte
    assert np.array_equal(pixels(clean), pixels(original))
    assert images.load_image(clean).image.size == (64, 80)  # orientation 6 applied


def test_a_multi_page_tiff_is_stored_as_its_first_page_the_one_searched() -> None:
    original = _tagged_tiff(_grey(), pages=3)
    with Image.open(io.BytesIO(original)) as img:
        assert img.n_frames == 3
    clean = privacy.strip_tiff(original)
    with Image.open(io.BytesIO(clean)) as img:
        assert img.n_frames == 1
    assert b"page 2" in original and b"page 2" not in clean and b"page 3" not in clean
    assert np.array_equal(pixels(clean), pixels(original))  # raiox searches page 1


def test_broken_tiffs_are_refused_not_stored() -> None:
    original = _tagged_tiff(_grey())
    with pytest.raises(images.ImageError, match="past the end"):
        privacy.strip_tiff(original[: len(original) // 3])
    with pytest.raises(images.ImageError):
        privacy.strip_tiff(b"II*\x00" + b"\xff\xff\xff\x7f")


@pytest.mark.parametrize("lossless", [True, False])
def test_webp_exif_and_xmp_removed_pixels_and_orientation_kept(lossless: bool) -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">Paciente Ana Souza</x:xmpmeta>'
    out = io.BytesIO()
    _grey().convert("RGB").save(out, "WEBP", lossless=lossless, exif=exif_with_camera(6), xmp=xmp)
    original = out.getvalue()
    clean = privacy.strip_webp(original)
    for text in (b"CameraCo", b"Dr. Artist", b"Ana Souza", b"XMP "):
        assert text in original and text not in clean
    assert privacy.orientation_exif(clean) == 6
    assert np.array_equal(pixels(clean), pixels(original))
    image_chunk = b"VP8L" if lossless else b"VP8 "
    at, was = clean.index(image_chunk), original.index(image_chunk)
    size = int.from_bytes(original[was + 4 : was + 8], "little")
    assert clean[at : at + 8 + size] == original[was : was + 8 + size]
    plain = io.BytesIO()
    _grey().save(plain, "WEBP", lossless=True)
    assert privacy.strip_webp(plain.getvalue()) == plain.getvalue()  # nothing to remove


def test_store_image_keys_the_clean_bytes(tmp_path: Path) -> None:
    settings = config.resolve(env={"RAIOX_HOME": str(tmp_path)})
    store = storage.LocalStore(tmp_path / "objects")
    original = dicom_with_patient()
    key = privacy.store_image(store, original, "DICOM", settings)
    stored = store.get(key)
    assert b"Souza" not in stored and np.array_equal(pixels(stored), pixels(original))
    assert privacy.store_image(store, original, "DICOM", settings) == key  # idempotent
    png = io.BytesIO()
    _grey().save(png, "PNG")
    plain = png.getvalue()
    assert store.get(privacy.store_image(store, plain, "PNG", settings)) == plain


def test_ingest_and_search_save_store_only_clean_copies(
    migrated: config.Settings, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from raiox_cli.cli import app

    folder = tmp_path / "catalogue" / "Acme" / "Fixture 4.0x10"
    folder.mkdir(parents=True)
    (folder / "exam.dcm").write_bytes(dicom_with_patient())
    photo = io.BytesIO()
    _grey(2).save(photo, "JPEG", exif=exif_with_camera(1), comment=b"patient Ana Souza")
    (folder / "photo.jpg").write_bytes(photo.getvalue())
    (folder / "sensor.tif").write_bytes(_tagged_tiff(_grey(4), pages=2))
    webp = io.BytesIO()
    _grey(5).save(webp, "WEBP", exif=exif_with_camera(1), xmp=b"<x>Ana Souza</x>")
    (folder / "photo.webp").write_bytes(webp.getvalue())
    runner = CliRunner()
    ingested = runner.invoke(app, ["ingest", str(tmp_path / "catalogue"), "--json"])
    assert ingested.exit_code == 0, ingested.output
    query = tmp_path / "query.jpg"
    query.write_bytes(photo.getvalue())
    searched = runner.invoke(app, ["search", str(query), "--save", "--json", "--no-tta"])
    assert searched.exit_code == 0, searched.output

    stored = [p.read_bytes() for p in (migrated.home / "objects").rglob("*") if p.is_file()]
    assert len(stored) == 4  # the query is the catalogue photo's bytes: one clean object
    for data in stored:
        for text in (b"Souza", b"PAC-12345", b"19800101", b"CameraCo", *IDENTIFYING):
            assert text not in data
    with db.connect(migrated) as conn:
        keys = {r[0] for r in conn.execute("SELECT storage_key FROM implant_images")}
        saved = conn.execute("SELECT storage_key, image_sha256 FROM analyses").fetchone()
    assert saved is not None and saved[0] in keys  # the analysis points at the clean copy
