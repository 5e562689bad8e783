"""De-identification through the server: what a webhook download or an upload leaves
in storage carries no patient identity and decodes to the pixels that were analysed."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pydicom
from PIL import Image

from raiox_cli import db, images
from raiox_cli.clinics import keys as clients
from raiox_cli.search import query as search
from tests.helpers.catalogue import Catalogue
from tests.helpers.privacy import dicom_with_patient, exif_with_camera, pixels
from tests.helpers.server import TOKEN, Site, running


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
        out, "JPEG", exif=exif_with_camera(1), quality=95
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
