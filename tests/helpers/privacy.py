"""Radiographs that carry a patient's identity, for the de-identification tests."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from raiox_cli import images

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


def exif_with_camera(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "CameraCo"  # Make
    exif[0x013B] = "Dr. Artist"  # Artist
    exif[0x9003] = "2024:01:02 03:04:05"  # DateTimeOriginal
    exif[0x0112] = orientation
    return exif.tobytes()
