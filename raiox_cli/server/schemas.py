"""The API's answers as pydantic models: what /openapi.json documents and what the
contract test holds every response to. The handlers build plain dicts (results.py);
these models describe them, so keep the two in step (tests/server/test_contract.py fails
when they drift)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["pending", "running", "done", "failed"]


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable reason", examples=["not_found"])
    message: str = Field(description="one line for a person", examples=["no such analysis"])


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {"code": "not_found", "message": "no such analysis"},
                    "detail": "no such analysis",
                }
            ]
        }
    )

    error: ErrorBody
    detail: Any = Field(description="the message again (or validation details), as before v1")


IMAGE_LINK = (
    "a link that expires after RAIOX_LINK_EXPIRES_S: presigned by S3, or the server's own "
    "signed `/v1/images/<token>` for a local store (with RAIOX_PUBLIC_URL in notifications); "
    "null when there is none"
)


class AnalysisImage(BaseModel):
    sha256: str | None
    url: str | None = Field(description=IMAGE_LINK)


class Match(BaseModel):
    rank: int = Field(ge=1)
    implant_id: int | None
    key: str
    name: str | None
    manufacturer: str | None
    system: str | None
    diameter_mm: float | None
    length_mm: float | None
    connection: str | None
    score: float
    image_id: int | None
    image_url: str | None = Field(description=IMAGE_LINK)


class Trust(BaseModel):
    """How far to trust the answer (raiox calibrate). Without a calibration (or with
    random weights) calibrated is false, the numbers are null, reason says why and
    verdict comes from fixed score thresholds."""

    calibrated: bool
    verdict: Literal["strong", "possible", "none", "not_in_catalogue"]
    probability: float | None = Field(
        description="calibrated probability that the first match is the right implant"
    )
    prediction_set: list[str] = Field(
        description="implant keys: with set_coverage confidence the right one is among them"
    )
    set_coverage: float | None = Field(description="the coverage the set was built for")
    out_of_catalogue: bool | None = Field(
        description="the X-ray probably shows an implant that is not in the catalogue"
    )
    out_of_catalogue_score: float | None = Field(
        description="1 - the conformal p-value of the top score; higher: more likely outside"
    )
    reason: str | None = Field(description="why the answer is not calibrated")
    calibration_id: int | None
    calibrated_at: str | None


class Notification(BaseModel):
    status: Literal["pending", "sent", "failed"]
    attempts: int
    error: str | None


class ConfirmedImplant(BaseModel):
    id: int
    key: str
    name: str | None = None
    manufacturer: str | None = None
    system: str | None = None


class Confirmation(BaseModel):
    """The dentist's answer for an analysis (the latest one counts)."""

    id: int
    analysis_id: str = Field(description="the analysis's public id")
    not_in_catalogue: bool
    implant: ConfirmedImplant | None
    raiox_rank: int | None = Field(description="where raiox ranked it; null: not listed")
    note: str | None
    client_id: str | None
    confirmed_at: str = Field(description="UTC, ISO 8601 with offset")
    previous: dict[str, Any] | None = None


class Analysis(BaseModel):
    """One submitted X-ray and its result."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "6f1c2a4e-3b5d-4c8e-9a0b-1d2e3f405162",
                    "status": "done",
                    "source": "webhook",
                    "clinic": "Clinica Sorriso",
                    "client_id": "clinic-42",
                    "metadata": {},
                    "model_id": "ViT-B-32:laion2b_s34b_b79k",
                    "attempts": 1,
                    "error": None,
                    "error_kind": None,
                    "lang": "pt-BR",
                    "crop": None,
                    "created_at": "2026-11-27T22:12:26.123456+00:00",
                    "finished_at": "2026-11-27T22:12:27.654321+00:00",
                    "result_url": "https://raiox.example/r/AQ...",
                    "image": {"sha256": "ab12...", "url": "https://..."},
                    "matches": [
                        {
                            "rank": 1,
                            "implant_id": 17,
                            "key": "acme dental/acme active/acme active 4.1x10",
                            "name": "Acme Active 4.1x10",
                            "manufacturer": "Acme Dental",
                            "system": "Acme Active",
                            "diameter_mm": 4.1,
                            "length_mm": 10.0,
                            "connection": "conical",
                            "score": 0.934,
                            "image_id": 301,
                            "image_url": "https://...",
                        }
                    ],
                    "confirmation": None,
                }
            ]
        },
    )

    id: str = Field(description="public id (UUID); internal ids are never exposed")
    status: Status
    source: Literal["cli", "upload", "webhook"]
    clinic: str | None
    client_id: str | None
    metadata: dict[str, Any]
    model_id: str | None
    attempts: int
    error: str | None = Field(description="why it failed, for the operator (technical)")
    error_kind: Literal["image", "download", "catalogue", "internal"] | None = Field(
        description="why it failed, in a few words a page can explain"
    )
    lang: str | None = Field(description="the language its e-mail and page are written in")
    crop: list[int] | None = Field(
        description="the region searched, in pixels of the X-ray: [x, y, width, height]"
    )
    created_at: dt.datetime
    finished_at: dt.datetime | None
    result_url: str | None = Field(
        description="the dentist's result page (signed, expiring: RAIOX_RESULT_LINK_EXPIRES_S); "
        "null unless RAIOX_PUBLIC_URL is set"
    )
    image: AnalysisImage
    matches: list[Match]
    trust: Trust | None = Field(
        default=None, description="how far to trust the answer; null for analyses made before"
    )
    confirmation: Confirmation | None
    notifications: dict[Literal["webhook", "email"], Notification] | None = Field(
        None, description="each channel's delivery of the finished analysis, once queued"
    )
    confidence: Literal["strong", "possible", "none", "not_in_catalogue"] | None = Field(
        None, description="in notifications of a finished analysis: the page's wording"
    )


class UploadResult(Analysis):
    confident: bool = Field(description="the best score reached --min-score")


class Accepted(BaseModel):
    """202: recorded, a worker will process it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "6f1c2a4e-3b5d-4c8e-9a0b-1d2e3f405162",
                    "status": "pending",
                    "url": "https://raiox.example/v1/analyses/6f1c2a4e-3b5d-4c8e-9a0b-1d2e3f405162",
                    "result_url": "https://raiox.example/r/AQ...",
                    "replayed": False,
                }
            ]
        },
    )

    id: str
    status: Status
    url: str = Field(description="where the API answers for it (GET, under /v1)")
    result_url: str | None = Field(
        description="the dentist's result page; null unless RAIOX_PUBLIC_URL is set"
    )
    replayed: bool = Field(description="the same delivery was received before")


class AcceptedDone(Analysis):
    """200 (with ?wait=N, or a replay of a finished delivery): the result inline."""

    url: str
    replayed: bool


class AnalysisSummary(BaseModel):
    id: str
    url: str
    result_url: str | None
    status: Status
    source: Literal["cli", "upload", "webhook"]
    client_id: str | None
    clinic: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    top_implant: str | None = Field(description="the best match's key")
    top_name: str | None = Field(description="the best match's name")
    top_score: float | None


class AnalysisPage(BaseModel):
    limit: int
    items: list[AnalysisSummary]


class _ImplantFields(BaseModel):
    """What the catalogue list and an implant's own page both show."""

    id: int
    key: str
    name: str | None
    manufacturer: str | None
    system: str | None
    diameter_mm: float | None
    length_mm: float | None
    connection: str | None


class ImplantSummary(_ImplantFields):
    images: int = Field(description="how many reference images")


class ImplantPage(BaseModel):
    total: int
    skip: int
    limit: int
    items: list[ImplantSummary]


class ImplantImage(BaseModel):
    id: int
    sha256: str
    format: str | None
    width: int | None
    height: int | None
    url: str | None


class Implant(_ImplantFields):
    notes: str | None
    extra: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime
    images: list[ImplantImage]


class Health(BaseModel):
    status: Literal["ok", "stuck", "error"]
    version: str
    model_id: str
    database: bool
    pending: int | None = None
    oldest_due_s: float | None = None


# --- errors: codes and the responses each operation declares ---------------------

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}

DESCRIPTIONS = {
    400: "Malformed request (a field out of bounds, not valid JSON, ...)",
    401: "Missing or wrong token, key or signature",
    403: "Not allowed (a Jotform form outside the allow-list, a clinic key on /metrics)",
    404: "Not found (also another clinic's analysis)",
    409: "The analysis has no result to confirm yet",
    413: "Body over RAIOX_SERVER_MAX_BYTES",
    422: "A parameter or field fails validation, or the image cannot be read",
    429: "Too many failed authentications from this address",
    503: "Database unreachable, catalogue empty or built with another model",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry declaring these error statuses with the error model."""
    return {
        status: {"model": ErrorResponse, "description": DESCRIPTIONS.get(status, CODES[status])}
        for status in statuses
    }


def error_body(status: int, message: str, detail: Any = None) -> dict[str, Any]:
    return {
        "error": {"code": CODES.get(status, "error"), "message": message},
        "detail": message if detail is None else detail,
    }
