"""Schemathesis hooks for the contract run (tests/server/test_contract.py): the `st`
process imports this module (SCHEMATHESIS_HOOKS) and reads what it needs from the
environment the test sets.

"Positive data" must mean data raiox can use, where what makes it usable is not a
shape JSON Schema can state: an upload is an image in a format raiox reads (not any
bytes), a Jotform delivery's rawRequest is the form's answers as Jotform writes them
(JSON naming the upload), and a confirmation names an implant that is in this
server's catalogue. Each hook rewrites only cases generated as positive, and
schemathesis revalidates the rewritten case against the schema before sending it;
negative cases reach the server untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from functools import cache
from typing import Any

import numpy as np
import schemathesis
from PIL import Image
from schemathesis.core.parameters import ParameterLocation

IMAGE_URL = "RAIOX_CONTRACT_IMAGE_URL"  # an X-ray the worker may download (loopback)
IMPLANT_KEYS = "RAIOX_CONTRACT_IMPLANT_KEYS"  # the catalogue's keys, as a JSON list


@cache
def real_images() -> list[tuple[str, bytes]]:
    """One X-ray-like picture in every format raiox reads, 16-bit TIFF included."""
    ramp = np.linspace(0, 1, 96 * 80).reshape(80, 96)
    eight = Image.fromarray((ramp * 255).astype(np.uint8), "L")
    sixteen = Image.fromarray((ramp * 65535).astype(np.uint16))
    out = []
    for name, picture, fmt in (
        ("x.png", eight, "PNG"),
        ("x.jpg", eight, "JPEG"),
        ("x.tif", sixteen, "TIFF"),
        ("x.webp", eight, "WEBP"),
        ("x.bmp", eight, "BMP"),
    ):
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        out.append((name, buffer.getvalue()))
    return out


def _pick(options: list[Any], seed: Any) -> Any:
    # Chosen from what schemathesis generated, so a replayed case sends the same bytes.
    digest = hashlib.sha256(repr(seed).encode()).digest()
    return options[digest[0] % len(options)]


def jotform_raw_request(image_url: str) -> str:
    """rawRequest as Jotform writes it: answers under q<N>_ keys, the upload listed in
    temp_upload and its URL under the field's bare name."""
    return json.dumps(
        {
            "slug": "submit/241234567890123/",
            "q3_clinicId": "clinic-42",
            "temp_upload": {"q5_xrayImage": ["xray.png#d41d8cd9"]},
            "xrayImage": [image_url],
        }
    )


def _positive(case: Any) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    operation = context.operation
    if operation is None or not _positive(case) or not isinstance(case.body, dict):
        return case
    route = (operation.method.upper(), operation.path)
    body = dict(case.body)
    if route == ("POST", "/v1/upload") and "file" in body:
        body["file"] = _pick(real_images(), body["file"])[1]
        case.body = body
        # schemathesis cannot validate a body holding bytes (it counts it invalid), so
        # its revalidation would relabel this case negative; the image is valid by
        # construction, and the case stays what it was generated as: positive.
        case._meta.clear_dirty(ParameterLocation.BODY)  # .meta would revalidate first
        return case
    elif (
        route == ("POST", "/v1/webhook")
        and case.media_type == "multipart/form-data"
        and "rawRequest" in body
    ):
        body["rawRequest"] = jotform_raw_request(os.environ[IMAGE_URL])
    elif route[1].endswith("/feedback") and isinstance(body.get("implant_key"), str):
        body["implant_key"] = _pick(json.loads(os.environ[IMPLANT_KEYS]), body["implant_key"])
    else:
        return case
    case.body = body
    return case
