"""The JSON API: submit an X-ray (webhook, upload), read, list and delete analyses,
confirm their implant, draw their sheet, browse the catalogue.

Requests only validate, authenticate and record; webhook submissions are analysed
by the worker threads (server/worker.py), so a slow download or model never holds a
connection from Jotform open, and nothing accepted is lost when the process is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
import uuid
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from raiox_cli import analyses, images
from raiox_cli.clinics import feedback, links, retention
from raiox_cli.db import queries
from raiox_cli.server import auth, i18n, inputs, jotform, logs, openapi, results, schemas
from raiox_cli.server.deps import (
    ConnDep,
    CurrentCaller,
    PublicId,
    analysis_url,
    authenticate,
    current_caller,
    is_form,
    json_ready,
    links_for,
    parse_form,
    parse_public_id,
    read_body,
    server_config,
    with_db,
)
from raiox_cli.store import objects as storage

MAX_WAIT_S = 60
MAX_PAGE = 100
MAX_ID = 2**63 - 1  # PostgreSQL bigint: a larger id cannot exist, so it is a 404 or a 422
MAX_SKIP = 2**31 - 1
FEEDBACK_MAX_BYTES = 16_384  # a confirmation is a few short fields

router = APIRouter()


class FeedbackIn(BaseModel):
    """The dentist's answer for an analysis: the implant it really is (any implant
    of the catalogue, by key), or `not_in_catalogue: true`; one of the two."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            # The rule one_answer enforces, stated: an implant, or "not in the catalogue".
            # if/then/else rather than oneOf: openapi-python-client writes invalid Python
            # for a boolean const inside oneOf branches.
            "if": {
                "properties": {"not_in_catalogue": {"const": True}},
                "required": ["not_in_catalogue"],
            },
            "then": {"properties": {"implant_key": {"type": "null"}}},
            "else": {
                "required": ["implant_key"],
                "properties": {"implant_key": {"type": "string"}},
            },
            "examples": [
                {"implant_key": "straumann/bone level/blx 4.0", "note": "surgical report"},
                {"not_in_catalogue": True, "note": "Neodent Helix GM"},
            ],
        },
    )

    implant_key: str | None = Field(
        None,
        min_length=1,
        pattern=inputs.NO_NUL,
        max_length=feedback.MAX_KEY,
        description="manufacturer/system/name (or manufacturer/name), any case",
    )
    not_in_catalogue: bool = False
    note: str | None = Field(None, max_length=feedback.MAX_NOTE, pattern=inputs.NO_NUL)
    client_id: str | None = Field(
        None, max_length=feedback.MAX_CLIENT_ID, pattern=inputs.NO_NUL, description="who confirms"
    )

    @model_validator(mode="after")
    def one_answer(self) -> FeedbackIn:
        if (self.implant_key is None) == (not self.not_in_catalogue):
            raise ValueError("give implant_key or not_in_catalogue: true, one of them")
        return self


# An ISO 8601 date or date-time that exists: days within their month, February 29th
# in leap years only, years 0001-9999 (what Python's datetime holds). The pattern is
# the whole rule, so a value the schema allows is one the server takes. `$(?!\n)`:
# Python's `$` also matches before a final newline, ECMA 262's does not.
_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(?:\d{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)|02-(?:0[1-9]|1\d|2[0-8]))"
    rf"|{_LEAP_YEAR}-02-29)"
)
_TIME = (
    r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):?[0-5]\d)?)?"
)
ISO_DATE_TIME = rf"^{_DATE}{_TIME}$(?!\n)"


def _date_time(value: str, name: str) -> dt.datetime:
    """An ISO 8601 date or date-time (UTC when it names no offset); 422 otherwise."""
    if re.match(ISO_DATE_TIME, value):
        with contextlib.suppress(ValueError):  # the pattern is meant to rule this out
            parsed = dt.datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
    problem = {
        "loc": ("query", name),
        "msg": "not an ISO 8601 date or date-time (2026-11-27 or 2026-11-27T08:00:00Z)",
        "type": "value_error",
    }
    raise RequestValidationError([problem])


# --- submitting ---------------------------------------------------------------------


@router.post(
    "/webhook",
    status_code=202,
    summary="Submit an X-ray by URL (JSON, or Jotform's multipart webhook)",
    response_model=schemas.Accepted,
    responses={
        200: {"model": schemas.AcceptedDone, "description": "Finished within ?wait=N"},
        **schemas.errors(400, 401, 403, 413, 422, 429, 503),
    },
    openapi_extra=openapi.WEBHOOK_EXTRA,
)
async def webhook(request: Request, wait: int = Query(0, ge=0, le=MAX_WAIT_S)) -> JSONResponse:
    """Record the submission (status pending) and answer 202 with its id; the
    same delivery again (Jotform submissionID or webhook-id) answers the same id.
    `?wait=N` waits up to N seconds for the result."""
    settings = server_config(request).settings
    accept_started = time.monotonic()
    body = await read_body(request, settings.server_max_bytes)
    form_post = is_form(request)
    caller, delivery_id = await run_in_threadpool(
        authenticate, request, body, signed_delivery=not form_post
    )
    for name, limit in openapi.SIGNATURE_HEADER_MAX.items():  # what the schema declares
        inputs.header(request.headers.get(name), name, max_len=limit)
    allowed_forms = frozenset(
        f.strip() for f in (settings.jotform_form_ids or "").split(",") if f.strip()
    )
    if form_post:
        form = await parse_form(request.headers, body)
        submission = jotform.parse_jotform(
            {k: v for k, v in form.items() if isinstance(v, str)},
            # A clinic's key is enough for its own forms; the allow-list guards
            # the operator token's URL (and is what lets an answer name a clinic).
            allowed_form_ids=allowed_forms if caller.is_operator else frozenset(),
            client_field=settings.jotform_client_field,
            upload_field=settings.jotform_upload_field,
            email_field=settings.jotform_email_field,
        )
    else:
        delivery_id = (
            delivery_id
            or inputs.header(request.headers.get("webhook-id"), "webhook-id")
            or inputs.header(request.headers.get("idempotency-key"), "Idempotency-Key")
        )
        submission = jotform.parse_json(body, delivery_id)

    def record(conn: psycopg.Connection) -> tuple[int, bool, uuid.UUID]:
        clinic_id = caller.clinic_id
        if (
            clinic_id is None
            and form_post
            and settings.jotform_clinic_from_answer
            and allowed_forms  # parse_jotform refused any other form
            and submission.client_id
        ):
            clinic_id = queries.clinic_by_name(conn, submission.client_id)
        analysis_id, created = queries.create_analysis(
            conn,
            source="webhook",
            client_id=submission.client_id,
            clinic_id=clinic_id,
            idempotency_key=submission.idempotency_key,
            image_url=submission.image_url,
            metadata=submission.metadata,
            reply_email=submission.reply_email,
        )
        row = queries.get_analysis(conn, analysis_id)
        conn.commit()
        assert row is not None
        return analysis_id, created, row["public_id"]

    analysis_id, created, public_id = await run_in_threadpool(with_db, request, record)
    request.state.analysis_id = public_id
    if created:
        request.app.state.worker.wake()
    logs.event("accepted" if created else "replayed", analysis_id=public_id)
    logs.audit("create" if created else "replay", client=caller.name, analysis=public_id)
    answer: dict[str, Any] = {
        "id": str(public_id),
        "status": "pending",
        "url": analysis_url(request, public_id),
        "result_url": links_for(request).result(public_id),
        "replayed": not created,
    }
    request.app.state.metrics.webhook_accept_seconds.observe(time.monotonic() - accept_started)
    if wait or not created:
        view = await run_in_threadpool(_wait_for, request, analysis_id, wait)
        answer.update(status=view["status"])
        if view["status"] in ("done", "failed"):
            return JSONResponse({**answer, **json_ready(view)}, status_code=200)
    return JSONResponse(answer, status_code=202)


def _wait_for(request: Request, analysis_id: int, wait_s: float) -> dict[str, Any]:
    to = links_for(request)
    latest: dict[str, Any] = {}

    def ended() -> bool:
        view = with_db(request, lambda conn: results.analysis(conn, to, analysis_id))
        latest.update(view or {})
        return latest.get("status") in ("done", "failed")

    request.app.state.worker.wait(analysis_id, wait_s, ended)
    return latest


@router.post(
    "/upload",
    summary="Identify an uploaded X-ray now (multipart field 'file')",
    response_model=schemas.UploadResult,
    responses=schemas.errors(400, 401, 413, 422, 429, 503),
    openapi_extra=openapi.UPLOAD_EXTRA,
)
async def upload(request: Request, k: int = Query(3, ge=1, le=MAX_PAGE)) -> JSONResponse:
    """The old synchronous API: answers with the top-k implants."""
    config = server_config(request)
    body = await read_body(request, config.settings.server_max_bytes)
    caller, _ = await run_in_threadpool(authenticate, request, body, signed_delivery=False)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise jotform.BadSubmission("send the image as multipart/form-data field 'file'")
    form = await parse_form(request.headers, body)
    part = form.get("file") or form.get("image")
    if not isinstance(part, UploadFile):
        raise jotform.BadSubmission("no file in multipart field 'file'")
    data = await part.read()
    view = await run_in_threadpool(_analyse_upload, request, caller, data, k)
    request.state.analysis_id = view["id"]
    logs.audit("create", client=caller.name, analysis=view["id"])
    return JSONResponse(json_ready(view))


def _analyse_upload(request: Request, caller: auth.Caller, data: bytes, k: int) -> dict[str, Any]:
    config = server_config(request)
    settings = config.settings
    loaded = analyses.load_upload(settings, data)

    def run(conn: psycopg.Connection) -> dict[str, Any]:
        analysis_id, result = analyses.analyse_now(
            conn,
            config.embedder,
            config.store,
            settings,
            data,
            loaded,
            clinic_id=caller.clinic_id,
            k=k,
        )
        view = results.analysis(conn, links_for(request), analysis_id)
        assert view is not None
        return {**view, "confident": result.confident}

    return with_db(request, run)


# --- analyses -------------------------------------------------------------------------


@router.get(
    "/analyses",
    summary="The caller's analyses, newest first",
    response_model=schemas.AnalysisPage,
    responses=schemas.errors(401, 422, 429, 503),
)
def list_analyses(
    request: Request,
    caller: CurrentCaller,
    conn: ConnDep,
    status: Literal["pending", "running", "done", "failed"] | None = None,
    since: str | None = Query(
        None,
        max_length=40,
        # Checked by _date_time (Python's re): pydantic's regex engine has no lookahead.
        json_schema_extra={"pattern": ISO_DATE_TIME},
        description="created at or after: an ISO 8601 date or date-time "
        "(2026-11-27, 2026-11-27T08:00:00Z; no offset means UTC), not Unix seconds",
        examples=["2026-11-27T08:00:00Z"],
    ),
    limit: int = Query(20, ge=1, le=MAX_PAGE),
) -> JSONResponse:
    """A clinic sees its own analyses; the operator every clinic's."""
    since_at = _date_time(since, "since") if since is not None else None
    rows = queries.list_analyses(
        conn, clinic_id=caller.clinic_id, status=status, since=since_at, limit=limit
    )
    to = links_for(request)
    items = [
        {
            **{k: v for k, v in row.items() if k != "public_id"},
            "id": str(row["public_id"]),
            "url": analysis_url(request, row["public_id"]),
            "result_url": to.result(row["public_id"]),
        }
        for row in rows
    ]
    logs.audit("list", client=caller.name, analysis=None, count=len(items))
    return JSONResponse(json_ready({"limit": limit, "items": items}))


@router.get(
    "/analyses/{analysis_id}",
    name="get_analysis",
    summary="An analysis and its result",
    response_model=schemas.Analysis,
    responses=schemas.errors(401, 404, 422, 429, 503),
)
def get_analysis(
    request: Request, analysis_id: PublicId, caller: CurrentCaller, conn: ConnDep
) -> JSONResponse:
    """Another clinic's analysis answers 404, exactly like one that does not exist."""
    public_id = parse_public_id(analysis_id)
    view = None
    if public_id is not None:
        request.state.analysis_id = public_id
        view = results.analysis_for(conn, links_for(request), public_id, caller.clinic_id)
    if view is None:
        raise HTTPException(404, "no such analysis")
    logs.audit("read", client=caller.name, analysis=public_id)
    return JSONResponse(json_ready(view))


@router.delete(
    "/analyses/{analysis_id}",
    status_code=204,
    summary="Delete an analysis and its stored X-ray",
    response_class=Response,
    responses=schemas.errors(401, 404, 422, 429, 503),
)
def delete_analysis(
    request: Request, analysis_id: PublicId, caller: CurrentCaller, conn: ConnDep
) -> Response:
    """The clinic's own analysis (404 for another clinic's, like a missing one);
    its image leaves the store unless another analysis shows the same bytes. Only
    an anonymous count is kept."""
    public_id = parse_public_id(analysis_id)
    request.state.analysis_id = public_id
    row = None
    if public_id is not None:
        row = queries.find_analysis(conn, public_id, clinic_id=caller.clinic_id)
    store = server_config(request).store
    if row is None or not retention.delete_analysis(conn, store, row["id"]):
        raise HTTPException(404, "no such analysis")
    logs.audit("delete", client=caller.name, analysis=public_id)
    return Response(status_code=204)


@router.post(
    "/analyses/{analysis_id}/feedback",
    status_code=201,
    summary="Confirm which implant an analysis really shows",
    response_model=schemas.Confirmation,
    responses=schemas.errors(400, 401, 404, 409, 413, 422, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
        }
    },
)
async def post_feedback(request: Request, analysis_id: PublicId) -> JSONResponse:
    """Record the dentist's answer; answering again keeps the history and the
    latest answer counts. 201 with the confirmation (`raiox_rank`: where raiox
    had ranked that implant, null when it did not list it; `previous`: the answer
    this one replaces). 404 unknown analysis (or another clinic's), 409 analysis
    without a result yet, 422 unknown implant key or invalid body."""
    body = await read_body(request, FEEDBACK_MAX_BYTES)
    caller, _ = await run_in_threadpool(authenticate, request, body, signed_delivery=False)
    public_id = parse_public_id(analysis_id)
    if public_id is None:
        raise HTTPException(404, "no such analysis")
    request.state.analysis_id = public_id
    try:
        answer = FeedbackIn.model_validate_json(body)
    except ValidationError as exc:
        # Without the input: a body that is not UTF-8 cannot be echoed back as JSON.
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(errors) from None

    def record(conn: psycopg.Connection) -> feedback.Confirmation:
        done = feedback.confirm(
            conn,
            public_id,
            answer.implant_key,
            note=answer.note,
            # A clinic's key says who it is; only the operator's token may name one.
            client_id=answer.client_id if caller.is_operator else caller.name,
            clinic_id=caller.clinic_id,
        )
        conn.commit()
        return done

    done = await run_in_threadpool(with_db, request, record)
    logs.audit("feedback", client=caller.name, analysis=public_id)
    return JSONResponse(json_ready(done.to_dict()), status_code=201)


@router.get(
    "/analyses/{analysis_id}/sheet.png",
    summary="The contact sheet of a finished analysis (PNG), as `raiox search --sheet`",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **schemas.errors(401, 404, 409, 422, 429, 503),
    },
)
def get_sheet(
    request: Request,
    analysis_id: PublicId,
    caller: CurrentCaller,
    conn: ConnDep,
    lang: str | None = Query(
        None,
        max_length=16,
        description="`pt-BR` or `en`; by default the analysis's language, else RAIOX_LANG",
    ),
) -> Response:
    """Another clinic's analysis answers 404, exactly like one that does not exist.
    The words are in the language asked for, else the one the analysis was submitted
    in (as its e-mail), else the server's."""
    config = server_config(request)
    public_id = parse_public_id(analysis_id)
    row = None
    if public_id is not None:
        request.state.analysis_id = public_id
        row = queries.find_analysis(conn, public_id, clinic_id=caller.clinic_id)
    if row is None:
        raise HTTPException(404, "no such analysis")
    if row["status"] != "done":
        raise HTTPException(409, f"the analysis is {row['status']}: no sheet until it is done")
    chosen = i18n.supported(lang) or i18n.preferred(row.get("lang"), config.settings.default_lang)
    drawn = results.sheet_png(conn, config.store, row, chosen)
    logs.audit("sheet", client=caller.name, analysis=public_id)
    return Response(drawn, media_type="image/png", headers={"cache-control": "private"})


# --- stored images, for a local store (an S3 store's links are presigned) -----------

IMAGE_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "DICOM": "application/dicom",
}


@router.get(
    "/images/{token}",
    name="stored_image",
    summary="A stored image (an X-ray or a reference image) by its signed, expiring link",
    response_class=Response,
    responses={
        200: {
            "content": {
                kind: {"schema": {"type": "string", "format": "binary"}}
                for kind in (*IMAGE_TYPES.values(), "application/octet-stream")
            }
        },
        **schemas.errors(404, 410, 422),
    },
)
def stored_image(
    request: Request,
    token: str = Path(min_length=1, max_length=100, description="from an answer's url"),
) -> Response:
    """The links that answers (`image.url`, `matches[].image_url`, implant images) and
    notifications carry when images are kept in a local folder: like an S3 presigned
    link, the link itself is the credential, and it stops working after
    RAIOX_LINK_EXPIRES_S (410). Anything else is 404."""
    config = server_config(request)
    try:
        digest = links.verify_image(links.image_key(config.settings), token)
    except links.LinkExpired:
        raise HTTPException(410, "this image link has expired") from None
    except links.LinkInvalid:
        raise HTTPException(404, "no such image") from None
    try:
        data = config.store.get(storage.object_key(digest))
    except storage.ObjectNotFound:
        raise HTTPException(404, "no such image") from None
    kind = IMAGE_TYPES.get(images.sniff_format(data[:256]) or "", "application/octet-stream")
    return Response(data, media_type=kind, headers={"cache-control": "private, max-age=300"})


# --- the catalogue: not patient data, any authenticated caller may browse it ----------


@router.get(
    "/implants",
    summary="The catalogue, a page at a time",
    dependencies=[Depends(current_caller)],
    response_model=schemas.ImplantPage,
    responses=schemas.errors(401, 422, 429, 503),
)
def list_implants(
    conn: ConnDep,
    skip: int = Query(0, ge=0, le=MAX_SKIP),
    limit: int = Query(20, ge=1, le=MAX_PAGE),
) -> JSONResponse:
    items = queries.list_implants(conn, skip=skip, limit=limit)
    page = {"total": queries.count_implants(conn), "skip": skip, "limit": limit, "items": items}
    return JSONResponse(json_ready(page))


@router.get(
    "/implants/{implant_id}",
    summary="One implant and its reference images",
    dependencies=[Depends(current_caller)],
    response_model=schemas.Implant,
    responses=schemas.errors(401, 404, 422, 429, 503),
)
def get_implant(
    request: Request, conn: ConnDep, implant_id: int = Path(ge=1, le=MAX_ID)
) -> JSONResponse:
    view = results.implant(conn, links_for(request), implant_id)
    if view is None:
        raise HTTPException(404, f"no implant {implant_id}")
    return JSONResponse(json_ready(view))
