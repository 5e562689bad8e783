"""Pages a person looks at, rendered on the server: the upload page `/` (a clinic
signs in with its key once), the result page `/r/<signed token>`, and the e-mail
that carries its link. Templates in server/templates/, every visible word from
server/messages/ (i18n.py), a little vanilla JavaScript for drop and crop.

Security: the clinic key lives only in an HttpOnly, Secure, SameSite=Lax cookie
(never in a URL or a log); every form carries a CSRF token that must equal the
`raiox_csrf` cookie (double submit); a result token that is not genuine answers
the same 404 page whether or not the analysis exists, an expired one 410.
"""

from __future__ import annotations

import hmac
import io
import secrets
from pathlib import Path
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from PIL import Image, ImageDraw, ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from raiox_cli import analyses, images
from raiox_cli.clinics import feedback, keys, links
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import EmptyCatalogue, ModelMismatch, RaioxError
from raiox_cli.search import query as search
from raiox_cli.server import i18n, logs, results
from raiox_cli.server.deps import TooLarge, read_form, server_config, with_db

KEY_COOKIE = "raiox_key"
CSRF_COOKIE = "raiox_csrf"
LANG_COOKIE = "raiox_lang"
KEY_COOKIE_MAX_AGE = 180 * 24 * 3600  # "signed in once": half a year, then the key again
FORM_LIMIT = 64 * 1024  # sign-in, sign-out and confirm forms are tiny
DRAIN_FACTOR = 4  # an oversized upload is read to this many times the limit, then cut
REFRESH_S = 3  # the pending page reloads itself this often
HISTORY = 20
FOUND = 20
IMAGE_MAX_SIDE = 1200  # pixels: sharp on a phone, small on the wire
CROP_COLOUR = (255, 59, 48)

STATIC = Path(__file__).parent.parent / "static"

router = APIRouter(include_in_schema=False)


class CsrfFailed(RaioxError):
    """A form without the token of this browser's cookie: answered 403."""


# --- rendering -------------------------------------------------------------------


def page_lang(request: Request) -> str:
    """?lang= (the switch), else the cookie the switch set, else Accept-Language."""
    settings: Settings = server_config(request).settings
    for choice in (request.query_params.get("lang"), request.cookies.get(LANG_COOKIE)):
        lang = i18n.supported(choice)
        if lang:
            return lang
    return i18n.negotiate(request.headers.get("accept-language"), settings.default_lang)


def _csrf_token(request: Request) -> str:
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) < 32:
        token = getattr(request.state, "new_csrf", None) or secrets.token_urlsafe(32)
        request.state.new_csrf = token
    return token


def _set_cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="lax"
    )


def render(
    request: Request,
    template: str,
    *,
    title_key: str,
    status: int = 200,
    clinic: str | None = None,
    **context: Any,
) -> HTMLResponse:
    lang = page_lang(request)
    t = i18n.Translator(lang)
    csrf = _csrf_token(request)
    html = (
        i18n.environment()
        .get_template(template)
        .render(
            t=t,
            lang=lang,
            languages=i18n.LANGUAGES,
            title=t(title_key),
            csrf=csrf,
            clinic=clinic,
            **context,
        )
    )
    response = HTMLResponse(html, status_code=status)
    response.headers["cache-control"] = "no-store"
    response.headers["x-frame-options"] = "DENY"
    response.headers["referrer-policy"] = "no-referrer"
    response.headers["content-security-policy"] = (
        "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )
    if getattr(request.state, "new_csrf", None):
        _set_cookie(response, CSRF_COOKIE, csrf, None)
    if request.query_params.get("lang") and i18n.supported(request.query_params["lang"]):
        _set_cookie(response, LANG_COOKIE, lang, 365 * 24 * 3600)
    return response


def message_page(request: Request, key: str, status: int) -> HTMLResponse:
    t = i18n.Translator(page_lang(request))
    return render(
        request, "message.html", title_key=f"{key}.title", status=status, body=t(f"{key}.body")
    )


# --- helpers that every route shares ---------------------------------------------


def check_csrf(request: Request, form: Any) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get("csrf")
    if not cookie or not isinstance(sent, str) or not hmac.compare_digest(cookie, sent):
        raise CsrfFailed("missing or wrong CSRF token")


def _clinic(request: Request, conn: psycopg.Connection) -> keys.Clinic | None:
    key = request.cookies.get(KEY_COOKIE)
    return keys.authenticate(conn, key) if key else None


IMAGE_ERRORS: list[tuple[type[Exception], str]] = [
    (images.EmptyImage, "error.image.empty"),
    (images.UnsupportedImage, "error.image.unsupported"),
    (images.ImageTooLarge, "error.image.too_large"),
    (images.CorruptImage, "error.image.corrupt"),
    (images.CropOutsideImage, "error.image.crop"),
]


def image_error_key(exc: Exception) -> str:
    """The message a person reads for a loader refusal (subclasses first)."""
    for cls, key in IMAGE_ERRORS:
        if isinstance(exc, cls):
            return key
    return "error.image.other"


def _seconds(row: dict[str, Any]) -> float | None:
    if row.get("finished_at") and row.get("created_at"):
        return (row["finished_at"] - row["created_at"]).total_seconds()
    return None


# --- the upload page ------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    settings: Settings = server_config(request).settings

    def load(conn: psycopg.Connection) -> tuple[keys.Clinic | None, list[dict[str, Any]]]:
        clinic = _clinic(request, conn)
        if clinic is None:
            return None, []
        return clinic, queries.list_analyses(conn, clinic_id=clinic.id, limit=HISTORY)

    clinic, rows = await run_in_threadpool(with_db, request, load)
    if clinic is None:
        return render(request, "signin.html", title_key="signin.title", error=None)
    return _upload_page(request, settings, clinic, rows)


def _upload_page(
    request: Request,
    settings: Settings,
    clinic: keys.Clinic,
    rows: list[dict[str, Any]],
    *,
    error: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    t = i18n.Translator(page_lang(request), clinic.timezone or settings.timezone)
    history = [
        {
            "when": t.when(row["created_at"]),
            "status": row["status"],
            "top": row.get("top_name") or row.get("top_implant"),
            "url": links.result_path(settings, row["public_id"]),
        }
        for row in rows
    ]
    return render(
        request,
        "upload.html",
        title_key="upload.title",
        status=status,
        clinic=clinic.name,
        history=history,
        error=error,
    )


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await read_form(request, FORM_LIMIT)
    check_csrf(request, form)
    # Wrong keys count against the address like the API's (429 past the limit).
    limiter, address = request.app.state.limiter, request.client.host if request.client else "-"
    await run_in_threadpool(limiter.check, address)  # the shared counters: a database read
    key = form.get("key")
    key = key.strip() if isinstance(key, str) else ""
    clinic = await run_in_threadpool(
        with_db, request, lambda conn: keys.authenticate(conn, key) if key else None
    )
    if clinic is None:
        await run_in_threadpool(limiter.failed, address)
        logs.event("page sign-in refused")  # never the key
        t = i18n.Translator(page_lang(request))
        return render(
            request, "signin.html", title_key="signin.title", status=401, error=t("signin.wrong")
        )
    logs.event("page sign-in", clinic_id=clinic.id)
    response = RedirectResponse("/", status_code=303)
    _set_cookie(response, KEY_COOKIE, key, KEY_COOKIE_MAX_AGE)
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    form = await read_form(request, FORM_LIMIT)
    check_csrf(request, form)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(KEY_COOKIE, path="/", secure=True, httponly=True, samesite="lax")
    return response


def _crop(form: Any) -> images.Crop | None:
    """The crop fields (percent of the width and height), or None when left empty."""
    raw = [form.get(f"crop_{name}") for name in ("x", "y", "w", "h")]
    if all(not isinstance(v, str) or not v.strip() for v in raw):
        return None
    try:
        x, y, w, h = (float(str(v).replace(",", ".")) / 100 for v in raw)
    except (TypeError, ValueError):
        raise images.BadCrop("crop fields are not numbers") from None
    if w <= 0 or h <= 0:
        return None  # a click without a drag: no box
    if not (0 <= x < 1 and 0 <= y < 1) or x + w > 1.0001 or y + h > 1.0001:
        raise images.BadCrop("crop outside 0-100%")
    return images.Crop(x, y, min(w, 1 - x), min(h, 1 - y), fractional=True)


@router.post("/submit")
async def submit(request: Request) -> Response:
    """The upload form: store the X-ray, queue it, answer with its result page."""
    config = server_config(request)
    settings: Settings = config.settings
    try:
        form = await read_form(request, settings.server_max_bytes)
    except TooLarge:
        # Read (and drop) the rest first: a browser still sending shows no answer.
        await _drain(request, DRAIN_FACTOR * settings.server_max_bytes)
        return await run_in_threadpool(
            with_db, request, lambda conn: _refused(request, conn, "error.image.too_large", 413)
        )
    check_csrf(request, form)
    t = i18n.Translator(page_lang(request))
    part = form.get("file")
    data = await part.read() if isinstance(part, UploadFile) else b""
    chosen = isinstance(part, UploadFile) and bool(part.filename)

    def record(conn: psycopg.Connection) -> Response:
        clinic = _clinic(request, conn)
        if clinic is None:
            return RedirectResponse("/", status_code=303)

        def refuse(key: str) -> HTMLResponse:
            rows = queries.list_analyses(conn, clinic_id=clinic.id, limit=HISTORY)
            return _upload_page(request, settings, clinic, rows, error=t(key), status=422)

        if not data:  # a file chosen but empty says so, not "choose a file"
            return refuse("error.image.empty" if chosen else "error.no_file")
        try:
            loaded = analyses.load_upload(settings, data, crop=_crop(form))
            search.catalogue_model(conn, config.embedder.model_id)
        except images.BadCrop:
            return refuse("error.bad_crop")
        except images.ImageError as exc:
            logs.event("page upload refused", clinic_id=clinic.id, reason=str(exc))
            return refuse(image_error_key(exc))
        except (EmptyCatalogue, ModelMismatch):
            return refuse("error.catalogue")
        analysis_id = analyses.accept_upload(
            conn,
            config.store,
            settings,
            data,
            loaded,
            clinic_id=clinic.id,
            client_id=clinic.name,
            lang=t.lang,
        )
        row = queries.get_analysis(conn, analysis_id)
        conn.commit()
        request.state.analysis_id = row["public_id"]
        logs.audit("create", client=clinic.name, analysis=row["public_id"], via="page")
        return RedirectResponse(links.result_path(settings, row["public_id"]), status_code=303)

    response = await run_in_threadpool(with_db, request, record)
    if request.state.analysis_id is not None:
        request.app.state.worker.wake()
    return response


def _refused(request: Request, conn: psycopg.Connection, key: str, status: int) -> Response:
    """The upload page again with this refusal (or the sign-in page, signed out)."""
    clinic = _clinic(request, conn)
    if clinic is None:
        return RedirectResponse("/", status_code=303)
    rows = queries.list_analyses(conn, clinic_id=clinic.id, limit=HISTORY)
    t = i18n.Translator(page_lang(request))
    settings = server_config(request).settings
    return _upload_page(request, settings, clinic, rows, error=t(key), status=status)


async def _drain(request: Request, limit: int) -> None:
    """Receive what is left of a refused body, up to `limit` bytes, unkept."""
    seen = 0
    while seen < limit:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


# --- the result page ---------------------------------------------------------------


def _analysis_for_token(
    request: Request, conn: psycopg.Connection, token: str
) -> dict[str, Any] | Response:
    """The analysis a genuine token opens, or the not-found / expired page."""
    try:
        public_id = links.verify(links.link_key(server_config(request).settings), token)
    except links.LinkExpired:
        return message_page(request, "error.gone", 410)
    except links.LinkInvalid:
        return message_page(request, "error.not_found", 404)
    row = queries.find_analysis(conn, public_id, clinic_id=None)
    if row is None:
        return message_page(request, "error.not_found", 404)
    request.state.analysis_id = public_id
    return row


def _confirmation_view(t: i18n.Translator, found: Any) -> dict[str, Any] | None:
    if found is None:
        return None
    implant = found.implant
    text = (
        t("confirm.recorded_none")
        if implant is None
        else t("confirm.recorded", name=f"{implant['name']} ({implant['manufacturer']})")
    )
    rank = None
    if implant is not None:
        rank = (
            t("confirm.recorded_rank", rank=found.raiox_rank)
            if found.raiox_rank
            else t("confirm.recorded_unranked")
        )
    who = found.client_id or t("confirm.who_link")
    return {
        "text": text,
        "when": t("confirm.recorded_when", when=t.when(found.confirmed_at), who=who),
        "rank": rank,
    }


def result_view(
    conn: psycopg.Connection,
    settings: Settings,
    row: dict[str, Any],
    t: i18n.Translator,
    base: str,
    q: str | None = None,
) -> dict[str, Any]:
    """Everything the result template shows, from the analysis row."""
    t = i18n.Translator(t.lang, row.get("clinic_timezone") or settings.timezone)
    view: dict[str, Any] = {
        "status": row["status"],
        "base": base,
        "sent_at": t("result.sent_at", when=t.when(row["created_at"])),
        "q": q,
    }
    if row["status"] == "failed":
        view["failed_reason"] = t.failure(row)
    if row["status"] != "done":
        return view
    matches = queries.analysis_matches(conn, row["id"])
    scores = [float(m["score"]) for m in matches]
    seconds = _seconds(row)
    trust = row.get("trust")  # as the answer carried it; older analyses have none
    names = {m["implant_key"]: m["name"] or m["implant_key"] for m in matches}
    words = results.trust_words(t, trust, names)
    confirmed = feedback.latest(conn, row["id"])
    confirmed_key = confirmed.implant["key"] if confirmed and confirmed.implant else None
    view.update(
        # Random weights (a test model) and nothing calibrated: the scores mean
        # nothing, so a banner says so instead of a verdict.
        meaningless=str(row["model_id"] or "").endswith(":none") and not words["calibrated"],
        confidence=trust["verdict"]
        if trust
        else search.confidence(scores, settings.min_score, settings.min_margin),
        trust=words,
        query_src=f"{base}/image/query",
        query_alt=t("result.query_alt_crop" if row.get("crop") else "result.query_alt"),
        model_id=row["model_id"],
        analysed_in=t("result.analysed_in", seconds=t.seconds(seconds)) if seconds else "",
        matches=[
            {
                "rank": m["rank"],
                "key": m["implant_key"] if m["implant_id"] is not None else None,
                "name": m["name"] or m["implant_key"],
                "manufacturer": m["manufacturer"] or "",
                "system": m["system"],
                "size": t.size(m["diameter_mm"], m["length_mm"]),
                "connection": t.vocabulary("connection", m["connection"]),
                "score": t.number(float(m["score"])),
                # coloured only by a calibrated set: a raw score is no verdict
                "above": m["implant_key"] in words["set"] if words["calibrated"] else None,
                "confirmed": confirmed_key is not None and m["implant_key"] == confirmed_key,
                "image_src": f"{base}/image/{m['rank']}" if m["storage_key"] else None,
            }
            for m in matches
        ],
        confirmation=_confirmation_view(t, confirmed),
        found=queries.find_implants_by_name(conn, q, limit=FOUND) if q else [],
    )
    return view


@router.get("/r/{token}", response_class=HTMLResponse)
async def result_page(request: Request, token: str, q: str | None = None) -> Response:
    settings: Settings = server_config(request).settings
    t = i18n.Translator(page_lang(request))
    query = (q or "").strip()[:100] or None

    def load(conn: psycopg.Connection) -> Response | dict[str, Any]:
        row = _analysis_for_token(request, conn, token)
        if isinstance(row, Response):
            return row
        logs.audit("page", client="result link", analysis=row["public_id"])
        return result_view(conn, settings, row, t, f"/r/{token}", query)

    view = await run_in_threadpool(with_db, request, load)
    if isinstance(view, Response):
        return view
    return render(
        request,
        "result.html",
        title_key="result.title",
        r=view,
        refresh_s=REFRESH_S,
        confirm_available=True,
        confirm_error=None,
    )


@router.post("/r/{token}/confirm")
async def confirm(request: Request, token: str) -> Response:
    """A confirm button: record through feedback.confirm, then show the page again."""
    form = await read_form(request, FORM_LIMIT)
    check_csrf(request, form)
    settings: Settings = server_config(request).settings
    t = i18n.Translator(page_lang(request))
    implant = form.get("implant")
    implant_key = implant.strip() if isinstance(implant, str) and implant.strip() else None
    not_listed = form.get("not_in_catalogue") == "1"
    note = form.get("note")
    note = note.strip() or None if isinstance(note, str) else None

    def record(conn: psycopg.Connection) -> Response | dict[str, Any]:
        row = _analysis_for_token(request, conn, token)
        if isinstance(row, Response):
            return row
        clinic = _clinic(request, conn)
        # The signed link belongs to the analysis's clinic: its answer is the clinic's.
        who = clinic.name if clinic else row.get("clinic")
        try:
            if implant_key is None and not not_listed:
                raise feedback.BadConfirmation("choose an implant")
            feedback.confirm(
                conn,
                row["id"],
                None if not_listed else implant_key,
                note=note if not_listed else None,
                client_id=who,
            )
            conn.commit()
        except RaioxError as exc:
            conn.rollback()
            view = result_view(conn, settings, row, t, f"/r/{token}")
            view["confirm_error"] = t("confirm.failed", reason=str(exc))
            return view
        logs.audit("feedback", client=who or "result link", analysis=row["public_id"])
        return RedirectResponse(f"/r/{token}#confirm", status_code=303)

    answer = await run_in_threadpool(with_db, request, record)
    if isinstance(answer, Response):
        return answer
    return render(
        request,
        "result.html",
        title_key="result.title",
        status=422,
        r=answer,
        refresh_s=REFRESH_S,
        confirm_available=True,
        confirm_error=answer.pop("confirm_error"),
    )


def _display(data: bytes, crop: list[int] | None) -> bytes:
    """An image a browser shows (DICOM too), the crop box drawn, at most 1200 px."""
    picture = images.load_image(data).image.convert("RGB")
    if crop:
        x, y, w, h = crop
        width = max(2, round(max(picture.size) / 250))
        ImageDraw.Draw(picture).rectangle(
            [x, y, x + w - 1, y + h - 1], outline=CROP_COLOUR, width=width
        )
    picture = ImageOps.contain(picture, (IMAGE_MAX_SIDE, IMAGE_MAX_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=88)
    return out.getvalue()


@router.get("/r/{token}/image/{which}")
async def result_image(request: Request, token: str, which: str) -> Response:
    """The query (which=query) or a match's reference image (which=rank), through
    the same signed token as the page: no other link to the stored objects."""
    store = server_config(request).store

    def load(conn: psycopg.Connection) -> Response:
        row = _analysis_for_token(request, conn, token)
        if isinstance(row, Response):
            return Response(status_code=row.status_code)
        crop = None
        if which == "query":
            key, crop = row["storage_key"], row.get("crop")
        else:
            ranks = {str(m["rank"]): m for m in queries.analysis_matches(conn, row["id"])}
            key = ranks[which]["storage_key"] if which in ranks else None
        if not key:
            return Response(status_code=404)
        return Response(
            _display(store.get(key), crop),
            media_type="image/jpeg",
            headers={"cache-control": "private, max-age=3600"},
        )

    return await run_in_threadpool(with_db, request, load)
