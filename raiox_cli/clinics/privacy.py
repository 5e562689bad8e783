"""What is stored of an image is de-identified here, once, for every path that
stores one (ingest, search --save, the server's webhook and upload).

- DICOM: the PS3.15 Annex E Basic Application Level Confidentiality Profile.
  `dicognito` (maintained, pydicom-based, ~0 dependencies) does the bulk: UIDs
  replaced consistently (seeded from the server secret, so the same original UID
  always maps to the same new one), person names, ids and accession numbers,
  addresses, institution and equipment replaced, dates and times shifted by one
  fixed offset, Patient Identity Removed / De-identification Method recorded.
  On top, the profile's Z/X actions dicognito keeps a value for: patient name, id,
  birth date/time, sex, age, size, weight and other descriptors emptied or
  removed, private tags, overlays and curves removed, the preamble zeroed (it can
  hold a whole TIFF). (`deid` needs a hand-written recipe for the same profile
  and pulls in matplotlib; a table written here alone would miss what dicognito's
  users found over years.) Pixel Data is never touched: the stored copy decodes to
  the same pixels, so its embedding is the same.
  Burned-in annotation: a DICOM that declares it (0028,0301 = YES) has patient data
  in its pixels, which no header edit removes; it is refused (`BurnedInAnnotation`),
  never stored. Absent or NO is accepted: most dental X-rays carry no such flag.
- JPEG: every APPn segment but JFIF (APP0), ICC profile (APP2) and Adobe (APP14)
  is dropped, with comments (COM), so EXIF (camera, dates, GPS, names), XMP and
  IPTC go; the compressed image data is copied byte for byte (no re-encoding).
  An EXIF orientation other than 1 is kept as a minimal EXIF holding only it.
- PNG: text chunks (tEXt, zTXt, iTXt), eXIf and tIME are dropped; pixels copied.
- TIFF, WebP, BMP: stored as received (BMP has no metadata; see README).
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import zlib
from typing import TYPE_CHECKING, Any

from raiox_cli.config import Settings
from raiox_cli.images import ImageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from raiox_cli.store.objects import Store

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "DICOM": "application/dicom",
}

# Basic profile attributes dicognito replaces with a realistic fake, or keeps,
# where the profile says Z (empty) or X (remove); keywords as in pydicom.
EMPTIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
REMOVED = (
    "PatientBirthTime",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientMotherBirthName",
    "PatientBirthName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Allergies",
    "PregnancyStatus",
    "SmokingStatus",
    "PatientState",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "RequestAttributesSequence",
    "DeviceSerialNumber",
    "StationName",
    "ContentCreatorName",
    "AdmittingDiagnosesDescription",
    "DerivationDescription",
    "ProtocolName",
    "PerformedProcedureStepDescription",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription",
)


class BurnedInAnnotation(ImageError):
    """A DICOM that says patient data is drawn into its pixels: never stored."""


@functools.lru_cache(maxsize=4)
def _anonymizer(seed: str) -> Any:
    from dicognito.anonymizer import Anonymizer

    return Anonymizer(seed=seed)


@functools.lru_cache(maxsize=4)
def dicom_seed(settings: Settings) -> str:
    """Seeds dicognito from the server secret: the same original UID gets the same
    replacement in every process (series stay together), and nobody without the
    secret can recompute the mapping."""
    from raiox_cli.clinics import links

    return links.derive_key(links.server_secret(settings), "dicom-uids").hex()


def deidentify_dicom(data: bytes, seed: str) -> bytes:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as exc:  # pydicom raises many classes on a broken header
        raise ImageError(f"DICOM header unreadable, not stored: {exc}") from None
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise BurnedInAnnotation(
            "the DICOM declares burned-in annotation (0028,0301 = YES): patient data may be "
            "drawn in the pixels, so it is not stored; send a copy without the annotation"
        )
    _anonymizer(seed).anonymize(ds)
    _basic_profile_extras(ds)
    out = io.BytesIO()
    ds.preamble = b"\0" * 128
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _basic_profile_extras(ds: Dataset) -> None:
    for keyword in EMPTIED:
        if keyword in ds:
            ds.data_element(keyword).value = ""  # type: ignore[union-attr]
    for keyword in REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    for tag in [e.tag for e in ds if (e.tag.group & 0xFF00) in (0x5000, 0x6000)]:
        del ds[tag]  # curves (50xx) and overlays (60xx): may hold text drawn over the image
    ds.walk(_clear_nested_identity)


def _clear_nested_identity(ds: Dataset, element: Any) -> None:
    # Names and ids inside sequences (e.g. referenced requests) get the same actions.
    if element.keyword in EMPTIED and element.VR in ("PN", "LO", "SH", "DA", "CS"):
        element.value = ""


def orientation_exif(data: bytes) -> int:
    """The EXIF orientation Pillow would apply when decoding (1 when none)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _minimal_exif(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()  # b"Exif\0\0" + a TIFF block with that one tag


JPEG_KEEP_APP = {0xE0, 0xE2, 0xEE}  # JFIF, ICC profile, Adobe (colour transform)


def strip_jpeg(data: bytes) -> bytes:
    """Drop metadata segments; everything from the first SOS on is copied as is."""
    if data[:2] != b"\xff\xd8":
        raise ImageError("not a JPEG (no SOI marker)")
    orientation = orientation_exif(data)
    out = [b"\xff\xd8"]
    if orientation != 1:
        exif = _minimal_exif(orientation)
        out.append(b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif)
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ImageError("JPEG markers are corrupt; not stored")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the rest is image data
            out.append(data[i:])
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out.append(data[i : i + 2])
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        segment = data[i : i + 2 + length]
        if len(segment) < 2 + length:
            raise ImageError("JPEG segment runs past the end of the file; not stored")
        is_app = 0xE0 <= marker <= 0xEF
        if marker != 0xFE and (not is_app or marker in JPEG_KEEP_APP):
            out.append(segment)
        i += 2 + length
    raise ImageError("JPEG has no image data (SOS); not stored")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_DROP = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def strip_png(data: bytes) -> bytes:
    if not data.startswith(PNG_SIGNATURE):
        raise ImageError("not a PNG (bad signature)")
    if not any(kind in data for kind in PNG_DROP):
        return data  # nothing to drop (a chunk name can also occur in pixel data: then scan)
    # Pillow decodes the whole image to find a PNG's EXIF: ask only when there is one.
    orientation = orientation_exif(data) if (b"eXIf" in data or b"exif" in data) else 1
    out, i = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while i + 8 <= len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > len(data):
            raise ImageError("PNG chunk runs past the end of the file; not stored")
        if kind == b"IDAT" and orientation != 1:
            out.append(_png_chunk(b"eXIf", _minimal_exif(orientation)[6:]))
            orientation = 1
        if kind not in PNG_DROP:
            out.append(data[i:end])
        i = end
        if kind == b"IEND":
            break
    return b"".join(out)


def deidentified(data: bytes, fmt: str, settings: Settings) -> bytes:
    """The bytes that may be stored for an image of this format (as images.py
    named it): de-identified, the pixels unchanged."""
    if fmt == "DICOM":
        return deidentify_dicom(data, dicom_seed(settings))
    if fmt == "JPEG":
        return strip_jpeg(data)
    if fmt == "PNG":
        return strip_png(data)
    return data


def store_image(store: Store, data: bytes, fmt: str, settings: Settings) -> str:
    """De-identify, then store; returns the object key (content-addressed by the
    stored bytes, which differ from the original's hash when anything was removed)."""
    clean = deidentified(data, fmt, settings)
    return store.put(hashlib.sha256(clean).hexdigest(), clean, content_type=CONTENT_TYPES.get(fmt))
