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
- TIFF: rewritten with the first page's image file directory only (the page raiox
  decodes and searches; further pages, thumbnails and SubIFDs are not stored), and
  in it only the tags a decoder needs (size, samples, compression, strips or tiles,
  colour, resolution, orientation, ICC profile): ImageDescription, Artist,
  DocumentName, Make/Model, DateTime, EXIF/GPS/XMP/IPTC and every private tag go.
  The strips or tiles are copied byte for byte.
- WebP: EXIF, XMP and unknown chunks dropped; the image chunks copied byte for byte;
  an orientation other than 1 kept as a minimal EXIF, as for JPEG.
- BMP: stored as received (it has no metadata).
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import zlib
from typing import TYPE_CHECKING, Any

from raiox_cli.clinics import links
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
    kinds = _png_chunk_kinds(data)
    if kinds is not None and not kinds & PNG_DROP:
        return data  # nothing to drop: the same bytes, not a copy
    if kinds is None and not any(kind in data for kind in PNG_DROP):
        return data
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


def _png_chunk_kinds(data: bytes) -> set[bytes] | None:
    """The chunk types of a PNG, read from the chunk headers alone (a handful of
    reads, where searching 1 MB of pixel data for each dropped name cost ~1.7 ms);
    None when a chunk runs past the end."""
    kinds, i = set(), len(PNG_SIGNATURE)
    while i + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, i)
        kind = data[i + 4 : i + 8]
        kinds.add(kind)
        i += 12 + length
        if i > len(data):
            return None
        if kind == b"IEND":
            break
    return kinds


# Baseline and extension tags a decoder needs; anything else (ImageDescription 270,
# DocumentName 269, Make 271, Model 272, PageName 285, Software 305, DateTime 306,
# Artist 315, HostComputer 316, Copyright 33432, XMP 700, IPTC 33723, Photoshop 34377,
# EXIF 34665, GPS 34853, SubIFDs 330, private tags >= 32768) is dropped.
TIFF_KEEP = frozenset(
    {254, 256, 257, 258, 259, 262, 266, 273, 274, 277, 278, 279, 280, 281, 282, 283, 284}
    | {296, 301, 317, 318, 319, 320, 322, 323, 324, 325, 338, 339, 340, 341, 347}
    | {529, 530, 531, 532, 34675}
)
TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
TIFF_MAX_ENTRIES = 1024
# Where the pixel data sits, and how long each piece is: (offsets tag, byte counts tag).
TIFF_STRIPS, TIFF_TILES = (273, 279), (324, 325)


class _Tiff:
    """Reads one classic TIFF's first IFD, bounds-checked (the input is hostile)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.order = {b"II": "<", b"MM": ">"}.get(data[:2])
        if self.order is None or self.unpack("H", 2) != 42:
            raise ImageError("not a classic TIFF; not stored")

    def unpack(self, kind: str, at: int, count: int = 1) -> Any:
        size = struct.calcsize(kind) * count
        if at < 0 or at + size > len(self.data):
            raise ImageError("TIFF structure runs past the end of the file; not stored")
        values = struct.unpack(f"{self.order}{count}{kind}", self.data[at : at + size])
        return values if count != 1 else values[0]

    def entries(self) -> dict[int, tuple[int, int, bytes]]:
        """IFD0's tags: tag -> (type, count, raw value bytes in the file's byte order)."""
        ifd = self.unpack("I", 4)
        count = self.unpack("H", ifd)
        if count > TIFF_MAX_ENTRIES:
            raise ImageError(f"TIFF directory lists {count} tags; not stored")
        found = {}
        for n in range(count):
            at = ifd + 2 + 12 * n
            tag, kind = self.unpack("H", at), self.unpack("H", at + 2)
            length = self.unpack("I", at + 4)
            size = TIFF_TYPE_SIZE.get(kind, 0) * length
            if tag not in TIFF_KEEP or size == 0:
                continue
            where = at + 8 if size <= 4 else self.unpack("I", at + 8)
            if where + size > len(self.data):
                raise ImageError(f"TIFF tag {tag} runs past the end of the file; not stored")
            found[tag] = (kind, length, self.data[where : where + size])
        return found

    def numbers(self, entry: tuple[int, int, bytes]) -> list[int]:
        kind, count, raw = entry
        code = {3: "H", 4: "I"}.get(kind)
        if code is None:
            raise ImageError("TIFF strip offsets are not SHORT or LONG; not stored")
        return list(struct.unpack(f"{self.order}{count}{code}", raw))


def strip_tiff(data: bytes) -> bytes:
    """The first page, with only the tags a decoder needs; strips or tiles copied as
    they are. The result is a new classic TIFF in the original's byte order."""
    tiff = _Tiff(data)
    tags = tiff.entries()
    compression = tiff.numbers(tags[259])[0] if 259 in tags and tags[259][0] == 3 else 1
    if compression == 6:
        raise ImageError("old-style JPEG compression in TIFF (6) is not stored; send PNG or JPEG")
    offsets_tag, counts_tag = TIFF_TILES if TIFF_TILES[0] in tags else TIFF_STRIPS
    if offsets_tag not in tags or counts_tag not in tags:
        raise ImageError("TIFF has no strip or tile offsets; not stored")
    offsets, counts = tiff.numbers(tags[offsets_tag]), tiff.numbers(tags[counts_tag])
    if len(offsets) != len(counts):
        raise ImageError("TIFF strip offsets and byte counts differ in number; not stored")
    pieces = []
    for offset, count in zip(offsets, counts, strict=True):
        if offset + count > len(data):
            raise ImageError("TIFF image data runs past the end of the file; not stored")
        pieces.append(data[offset : offset + count])
    order = tiff.order
    assert order is not None
    ordered = sorted({**tags, offsets_tag: (4, len(pieces), b"")}.items())
    ifd_size = 2 + 12 * len(ordered) + 4
    cursor = 8 + ifd_size
    values: list[bytes] = []
    value_at: dict[int, int] = {}
    for tag, (_kind, _count, raw) in ordered:
        size = 4 * len(pieces) if tag == offsets_tag else len(raw)
        if size > 4:
            value_at[tag] = cursor
            cursor += size + (size & 1)
    data_at = []
    for piece in pieces:
        data_at.append(cursor)
        cursor += len(piece) + (len(piece) & 1)
    if cursor > 0xFFFFFFFF:
        raise ImageError("TIFF too large to rewrite as a classic TIFF; not stored")
    out = [
        (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(f"{order}I", 8),
        struct.pack(f"{order}H", len(ordered)),
    ]
    for tag, (kind, count, raw) in ordered:
        if tag == offsets_tag:
            raw = struct.pack(f"{order}{len(data_at)}I", *data_at)
        if tag in value_at:
            field = struct.pack(f"{order}I", value_at[tag])
            values.append(raw + b"\x00" * (len(raw) & 1))
        else:
            field = raw.ljust(4, b"\x00")
        out.append(struct.pack(f"{order}HHI", tag, kind, count) + field)
    out.append(struct.pack(f"{order}I", 0))  # no next page
    out += values
    out += [piece + b"\x00" * (len(piece) & 1) for piece in pieces]
    return b"".join(out)


WEBP_KEEP = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF", b"ICCP"}
WEBP_EXIF_FLAG, WEBP_XMP_FLAG = 0x08, 0x04


def strip_webp(data: bytes) -> bytes:
    """Only the image chunks (and the ICC profile); EXIF, XMP and unknown chunks go.
    An orientation other than 1 stays as a minimal EXIF chunk, flagged in VP8X."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ImageError("not a WebP (bad RIFF header)")
    orientation = orientation_exif(data) if b"EXIF" in data else 1
    chunks, i = [], 12
    while i + 8 <= len(data):
        kind = data[i : i + 4]
        (size,) = struct.unpack("<I", data[i + 4 : i + 8])
        end = i + 8 + size + (size & 1)
        if i + 8 + size > len(data):
            raise ImageError("WebP chunk runs past the end of the file; not stored")
        if kind in WEBP_KEEP:
            chunk = data[i:end]
            if kind == b"VP8X":  # the flags byte says which optional chunks follow
                flags = chunk[8] & ~(WEBP_EXIF_FLAG | WEBP_XMP_FLAG)
                if orientation != 1:
                    flags |= WEBP_EXIF_FLAG
                chunk = chunk[:8] + bytes([flags]) + chunk[9:]
            chunks.append(chunk)
        i = end
    if orientation != 1 and any(c[:4] == b"VP8X" for c in chunks):
        exif = _minimal_exif(orientation)[6:]  # WebP's EXIF chunk holds the bare TIFF block
        chunks.append(b"EXIF" + struct.pack("<I", len(exif)) + exif + b"\x00" * (len(exif) & 1))
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def deidentified(data: bytes, fmt: str, settings: Settings) -> bytes:
    """The bytes that may be stored for an image of this format (as images.py
    named it): de-identified, the pixels unchanged."""
    if fmt == "DICOM":
        return deidentify_dicom(data, dicom_seed(settings))
    if fmt == "JPEG":
        return strip_jpeg(data)
    if fmt == "PNG":
        return strip_png(data)
    if fmt == "TIFF":
        return strip_tiff(data)
    if fmt == "WEBP":
        return strip_webp(data)
    return data


def store_image(
    store: Store, data: bytes, fmt: str, settings: Settings, *, sha256: str | None = None
) -> str:
    """De-identify, then store; returns the object key (content-addressed by the
    stored bytes, which differ from the original's hash when anything was removed).
    `sha256`: the original bytes' hash when the caller has it (not computed again
    when nothing was removed)."""
    clean = deidentified(data, fmt, settings)
    digest = sha256 if clean is data and sha256 else hashlib.sha256(clean).hexdigest()
    return store.put(digest, clean, content_type=CONTENT_TYPES.get(fmt))
