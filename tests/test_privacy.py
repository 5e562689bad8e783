# ruff: noqa: F811  (fixtures imported from test_server are redefined as parameters)
"""De-identification of what is stored: DICOM (PS3.15 Annex E basic profile via
dicognito + the profile's Z/X actions), EXIF and text chunks out of JPEG/PNG, and
the stored copy decoding to exactly the pixels the embedding was computed from."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from test_server import TOKEN, Catalogue, Site, catalogue, running, site  # noqa: F401

from raiox_cli import config, db, images
from raiox_cli.clinics import keys as clients
from raiox_cli.clinics import privacy
from raiox_cli.search import query as search
from raiox_cli.store import objects as storage

PATIENT = {
    "PatientName": "Souza^Ana",
    "PatientID": "PAC-12345",
    "PatientBirthDate": "19800101",
    "InstitutionName": "Clinica Sorriso Paulista",
    "ReferringPhysicianName": "Lima^Carlos",
    "AccessionNumber": "ACC998877",
}


def dicom_with_patient(**extra: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in {**PATIENT, **extra}.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(images.load_image(data).image)


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


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "CameraCo"  # Make
    exif[0x013B] = "Dr. Artist"  # Artist
    exif[0x9003] = "2024:01:02 03:04:05"  # DateTimeOriginal
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_exif_and_comments_removed_pixels_and_orientation_kept(orientation: int) -> None:
    out = io.BytesIO()
    _grey().save(out, "JPEG", exif=_exif(orientation), comment=b"patient Ana Souza")
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
    _grey().save(out, "PNG", pnginfo=info, exif=_exif(8))
    original = out.getvalue()
    clean = privacy.strip_png(original)
    assert b"Ana Souza" in original and b"tEXt" in original and b"iTXt" in original
    for chunk in (b"tEXt", b"zTXt", b"iTXt", b"CameraCo", b"Ana Souza"):
        assert chunk not in clean
    assert privacy.orientation_exif(clean) == 8
    assert np.array_equal(pixels(clean), pixels(original))


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


def test_a_dicom_through_the_webhook_is_stored_without_the_patient(
    catalogue: Catalogue, tiny_embedder: Any, site: Site
) -> None:
    original = dicom_with_patient()
    site.routes["/exam.dcm"] = (200, original, {"Content-Type": "application/dicom"})
    with db.connect(catalogue.settings) as conn:
        key = clients.add(conn, "clinic-a")[1]
        expected = search.search_image(
            conn, tiny_embedder, images.load_image(original), k=3, ef_search=100, min_score=0.8
        )
    with running(
        catalogue, tiny_embedder, webhook_token=TOKEN, download_allow_loopback=True
    ) as base:
        done = httpx.post(
            f"{base}/webhook",
            params={"wait": 30},
            json={"image_url": site.base + "/exam.dcm"},
            headers={"x-raiox-key": key},
            timeout=40,
        ).json()
        assert done["status"] == "done", done
        stored = httpx.get(done["image"]["url"]).content  # the presigned link: what S3 holds
    assert stored != original and stored.startswith(b"\0" * 128 + b"DICM")
    for value in ("Souza", "Ana", "PAC-12345", "19800101", "Sorriso", "ACC998877"):
        assert value.encode() not in stored
    ds = pydicom.dcmread(io.BytesIO(stored))
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == ("", "", "")
    assert np.array_equal(pixels(stored), pixels(original))
    # The same analysis as for the original: same implants, same scores.
    assert [(m["implant_id"], round(m["score"], 5)) for m in done["matches"]] == [
        (m.implant_id, round(m.score, 5)) for m in expected.matches
    ]


def test_an_uploaded_jpeg_is_stored_without_exif(catalogue: Catalogue, tiny_embedder: Any) -> None:
    out = io.BytesIO()
    Image.open(io.BytesIO(catalogue.query_png)).convert("L").save(
        out, "JPEG", exif=_exif(1), quality=95
    )
    jpeg = out.getvalue()
    with running(catalogue, tiny_embedder, webhook_token=TOKEN) as base:
        answer = httpx.post(
            f"{base}/upload",
            files={"file": ("q.jpg", jpeg, "image/jpeg")},
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ).json()
    stored = httpx.get(answer["image"]["url"]).content
    assert b"CameraCo" in jpeg and b"CameraCo" not in stored and b"Exif" not in stored
    assert np.array_equal(pixels(stored), pixels(jpeg))


def test_ingest_and_search_save_store_only_clean_copies(
    migrated: config.Settings, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from raiox_cli.cli import app

    folder = tmp_path / "catalogue" / "Acme" / "Fixture 4.0x10"
    folder.mkdir(parents=True)
    (folder / "exam.dcm").write_bytes(dicom_with_patient())
    photo = io.BytesIO()
    _grey(2).save(photo, "JPEG", exif=_exif(1), comment=b"patient Ana Souza")
    (folder / "photo.jpg").write_bytes(photo.getvalue())
    runner = CliRunner()
    ingested = runner.invoke(app, ["ingest", str(tmp_path / "catalogue"), "--json"])
    assert ingested.exit_code == 0, ingested.output
    query = tmp_path / "query.jpg"
    query.write_bytes(photo.getvalue())
    searched = runner.invoke(app, ["search", str(query), "--save", "--json", "--no-tta"])
    assert searched.exit_code == 0, searched.output

    stored = [p.read_bytes() for p in (migrated.home / "objects").rglob("*") if p.is_file()]
    assert len(stored) == 2  # the query is the catalogue photo's bytes: one clean object
    for data in stored:
        for text in (b"Souza", b"PAC-12345", b"19800101", b"CameraCo", b"Dr. Artist"):
            assert text not in data
    with db.connect(migrated) as conn:
        keys = {r[0] for r in conn.execute("SELECT storage_key FROM implant_images")}
        saved = conn.execute("SELECT storage_key, image_sha256 FROM analyses").fetchone()
    assert saved is not None and saved[0] in keys  # the analysis points at the clean copy
