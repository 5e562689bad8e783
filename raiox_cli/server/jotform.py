"""Turn a webhook delivery (Jotform's multipart form or the old JSON API) into a
submission: the image URL, who sent it, and the key that makes replays harmless.

Jotform posts `multipart/form-data` with `formID`, `submissionID`, `formTitle`,
`rawRequest` (the answers, as a JSON string), `pretty` (a human summary: never
parsed, its format is not stable) and `ip`. Inside rawRequest, answers are
`q<N>_<field>` keys; uploads are listed under `temp_upload` as `q<N>_<field>`
and their URLs sit under the bare `<field>` key.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raiox_cli.errors import RaioxError
from raiox_cli.server import inputs
from raiox_cli.server.inputs import MAX_ID, MAX_TEXT, MAX_URL

MAX_OTHER_FILES = 20
ANSWER_KEY = re.compile(r"^q\d+_(.+)$")
EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")


class BadSubmission(inputs.BadInput):
    """The delivery is malformed: answered with 400 and never queued."""


class FormNotAllowed(RaioxError):
    """A Jotform form that is not in RAIOX_JOTFORM_FORM_IDS: answered with 403."""


def _submission_errors(parse: Callable[..., Submission]) -> Callable[..., Submission]:
    """A field check's BadInput surfaces as this module's BadSubmission."""

    @functools.wraps(parse)
    def checked(*args: Any, **kwargs: Any) -> Submission:
        try:
            return parse(*args, **kwargs)
        except BadSubmission:
            raise
        except inputs.BadInput as exc:
            raise BadSubmission(str(exc)) from None

    return checked


@dataclass(frozen=True)
class Submission:
    image_url: str
    client_id: str | None
    idempotency_key: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    reply_email: str | None = None  # the submitter's e-mail answer: told when it is done


def _text(value: Any) -> str | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list) and len(value) == 1:
        return _text(value[0])
    return json.dumps(value, sort_keys=True)  # e.g. a full-name answer {"first", "last"}


@_submission_errors
def parse_json(body: bytes, delivery_id: str | None) -> Submission:
    """The old API: {"image_url": ..., "client_id": ..., "metadata": {...}}."""
    data = inputs.loads(body, "body")
    if not isinstance(data, dict):
        raise BadSubmission("body must be a JSON object")
    image_url = data.get("image_url")
    if not isinstance(image_url, str) or not image_url.strip():
        raise BadSubmission('"image_url" (a string) is required')
    inputs.text(image_url, "image_url", max_len=MAX_URL)
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):  # null, false and 0 too: the schema says object
        raise BadSubmission('"metadata" must be an object (or left out)')
    inputs.json_value(metadata, "metadata")
    client_id = data.get("client_id")
    if isinstance(client_id, (int, float)) and not isinstance(client_id, bool):
        client_id = str(client_id)
    return Submission(
        image_url=image_url.strip(),
        client_id=inputs.optional_text(client_id, "client_id", max_len=MAX_ID),
        idempotency_key=(
            f"webhook-id:{inputs.text(delivery_id, 'webhook-id', max_len=MAX_ID)}"
            if delivery_id
            else None
        ),
        metadata=metadata,
    )


def _answer(raw: Mapping[str, Any], name: str) -> Any:
    """An answer by its field name, whatever its q<N>_ prefix."""
    for key, value in raw.items():
        match = ANSWER_KEY.match(key)
        if match and match[1] == name:
            return value
    return raw.get(name)


def _upload_urls(raw: Mapping[str, Any], upload_field: str | None) -> tuple[str, list[str]]:
    uploads = raw.get("temp_upload") or {}
    if not isinstance(uploads, dict):
        uploads = {}
    names = [m[1] for m in (ANSWER_KEY.match(k) for k in uploads) if m]
    if upload_field:
        names = [upload_field]
    elif not names:
        raise BadSubmission(
            "rawRequest lists no uploaded file (temp_upload); set RAIOX_JOTFORM_UPLOAD_FIELD"
        )
    for name in names:
        urls = raw.get(name)
        if isinstance(urls, str):
            urls = [urls]
        if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
            return name, urls
    raise BadSubmission(f"rawRequest has no file URL under the upload field {names[0]!r}")


@_submission_errors
def parse_jotform(
    form: Mapping[str, str],
    *,
    allowed_form_ids: frozenset[str],
    client_field: str,
    upload_field: str | None,
    email_field: str | None = None,
) -> Submission:
    form_id = inputs.text(form.get("formID") or "", "formID", max_len=MAX_ID).strip()
    submission_id = inputs.text(
        form.get("submissionID") or "", "submissionID", max_len=MAX_ID
    ).strip()
    if not form_id or not submission_id:
        raise BadSubmission("a Jotform delivery needs formID and submissionID")
    if allowed_form_ids and form_id not in allowed_form_ids:
        raise FormNotAllowed(f"form {form_id} is not in RAIOX_JOTFORM_FORM_IDS")
    raw = inputs.loads(form.get("rawRequest") or "", "rawRequest")
    if not isinstance(raw, dict):
        raise BadSubmission("rawRequest must be a JSON object")
    field_name, urls = _upload_urls(raw, upload_field)
    for index, url in enumerate(urls[: MAX_OTHER_FILES + 1]):
        inputs.text(url, f"{field_name}[{index}]", max_len=MAX_URL)
    title = inputs.optional_text(form.get("formTitle"), "formTitle", max_len=MAX_TEXT)
    metadata: dict[str, Any] = {
        "jotform": {
            "form_id": form_id,
            "submission_id": submission_id,
            "form_title": title,
            "upload_field": field_name,
        }
    }
    if len(urls) > 1:  # one X-ray per analysis; the others are kept for the record
        metadata["jotform"]["other_files"] = urls[1 : MAX_OTHER_FILES + 1]
    return Submission(
        image_url=urls[0],
        client_id=inputs.optional_text(
            _text(inputs.json_value(_answer(raw, client_field), client_field)),
            client_field,
            max_len=MAX_ID,
        ),
        idempotency_key=f"jotform:{form_id}:{submission_id}",
        metadata=metadata,
        reply_email=_email(_answer(raw, email_field)) if email_field else None,
    )


def _email(value: Any) -> str | None:
    """An e-mail answer, if it is one address (anything else is ignored, not sent to)."""
    text = _text(value)
    return text if text and len(text) <= 254 and EMAIL.match(text) else None
