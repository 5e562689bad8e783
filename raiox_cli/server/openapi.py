"""What /openapi.json says beyond the routes themselves: request bodies FastAPI cannot
infer (the handlers read raw bytes to bound and authenticate them first), the ways to
authenticate, the /v1 prefix, and the error shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Receive, Scope, Send

from raiox_cli.server.inputs import (
    MAX_DEPTH,
    MAX_ID,
    MAX_ITEMS,
    MAX_METADATA_BYTES,
    MAX_TEXT,
    MAX_URL,
    NO_NUL,
)

VERSION_PREFIX = "/v1"
# No authentication: the health check, and stored images (their signed link is the
# credential, as an S3 presigned link's is); /docs and /openapi.json are not in the schema.
PUBLIC = {"/healthcheck", "/images/{token}"}
NOT_VERSIONED = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

# An id with something besides blanks in it, and no NUL (PostgreSQL cannot store one).
_ID = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"
_METADATA = "#/components/schemas/Metadata"
_METADATA_VALUE = "#/components/schemas/MetadataValue"
# Any JSON a client keeps with an analysis, as inputs.json_value checks it: keys and
# strings without NUL, keys up to MAX_ID characters. The totals (items, depth, bytes)
# are not JSON Schema's to state; the description says them.
COMPONENT_SCHEMAS: dict[str, Any] = {
    "Metadata": {
        "type": "object",
        "propertyNames": {"maxLength": MAX_ID, "pattern": NO_NUL},
        "additionalProperties": {"$ref": _METADATA_VALUE},
        "description": f"kept with the analysis; at most {MAX_METADATA_BYTES // 1024} KiB as "
        f"JSON, {MAX_DEPTH} levels deep and {MAX_ITEMS} keys and items in all",
    },
    "MetadataValue": {
        "anyOf": [
            {"type": "string", "pattern": NO_NUL},
            {"type": ["number", "boolean", "null"]},
            {"type": "array", "items": {"$ref": _METADATA_VALUE}},
            {"$ref": _METADATA},
        ]
    },
}
_JSON_DELIVERY = {
    "type": "object",
    "required": ["image_url"],
    "properties": {
        "image_url": {"type": "string", "minLength": 1, "maxLength": MAX_URL, "pattern": _ID},
        # A number is taken as its text (senders that number their clinics).
        "client_id": {"type": ["string", "number", "null"], "maxLength": MAX_ID, "pattern": NO_NUL},
        "metadata": {"$ref": _METADATA},
    },
    "example": {
        "image_url": "https://www.jotform.com/uploads/clinic/241234567890123/57123/pano.jpg",
        "client_id": "clinic-42",
        "metadata": {"tooth": "36"},
    },
}
_JOTFORM_DELIVERY = {
    "type": "object",
    "required": ["formID", "submissionID", "rawRequest"],
    "properties": {
        "formID": {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": _ID},
        "submissionID": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID,
            "pattern": _ID,
        },
        "formTitle": {"type": "string", "maxLength": MAX_TEXT, "pattern": NO_NUL},
        "rawRequest": {
            "type": "string",
            "description": "the form's answers as a JSON string (uploads under temp_upload)",
        },
    },
}
# The longest value each delivery header may have; the webhook refuses longer ones.
SIGNATURE_HEADER_MAX = {
    "webhook-id": MAX_ID,
    "webhook-timestamp": MAX_ID,
    "webhook-signature": 1000,
    "Idempotency-Key": MAX_ID,
}
_SIGNATURE_HEADERS = [
    {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": SIGNATURE_HEADER_MAX[name]},
        "description": description,
    }
    for name, description in (
        ("webhook-id", "Standard Webhooks: the delivery id (replays answer the same analysis)"),
        ("webhook-timestamp", "Standard Webhooks: Unix seconds, within 5 minutes of now"),
        ("webhook-signature", 'Standard Webhooks: "v1,<base64 HMAC-SHA256>", space-separated'),
        ("Idempotency-Key", "unsigned deliveries: makes a retry answer the same analysis"),
    )
]

WEBHOOK_EXTRA: dict[str, Any] = {
    "description": (
        "Record the submission (status pending) and answer 202 with its id; the same "
        "delivery again (Jotform submissionID, webhook-id or Idempotency-Key) answers the "
        "same id with `replayed: true`. `?wait=N` waits up to N seconds and answers 200 "
        "with the result when it is ready.\n\n**Signatures.** When the server has "
        "RAIOX_WEBHOOK_SECRET, JSON deliveries must carry a valid "
        "[Standard Webhooks](https://www.standardwebhooks.com) signature: `webhook-id`, "
        "`webhook-timestamp` and `webhook-signature: v1,<base64 of HMAC-SHA256 over "
        '"{id}.{timestamp}.{body}">`. Jotform deliveries (multipart) carry the key in the '
        "URL instead (`?key=` or `?token=`)."
    ),
    "parameters": _SIGNATURE_HEADERS,
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _JSON_DELIVERY},
            "multipart/form-data": {"schema": _JOTFORM_DELIVERY},
        },
    },
}

UPLOAD_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG, TIFF, WebP, BMP or DICOM; at most "
                            "RAIOX_SERVER_MAX_BYTES (25 MiB)",
                        }
                    },
                },
                "encoding": {"file": {"contentType": "application/octet-stream"}},
            }
        },
    }
}

SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The operator token (RAIOX_WEBHOOK_TOKEN: every clinic) or a clinic "
        "key (`raiox clients add`: that clinic's analyses only)",
    },
    "operatorTokenHeader": {"type": "apiKey", "in": "header", "name": "X-Raiox-Token"},
    "clinicKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Raiox-Key"},
    "operatorTokenQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "for Jotform, which cannot send headers",
    },
    "clinicKeyQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "key",
        "description": "for Jotform, which cannot send headers",
    },
}
ANY_AUTH = [{name: []} for name in SECURITY_SCHEMES]

DESCRIPTION = """Identify the dental implant system in a radiograph.

Every path is under `/v1`; the unversioned paths (`/webhook`, ...) answer the same
for existing Jotform webhook URLs.

**Errors** all have one shape: `{"error": {"code": "not_found", "message": "..."},
"detail": "..."}` (`detail` repeats the message, or lists validation problems on a
422). Codes: bad_request 400, unauthorized 401, forbidden 403, not_found 404,
conflict 409, too_large 413, unprocessable 422, too_many_requests 429,
internal 500, unavailable 503.

Timestamps are UTC with an explicit offset (`2026-11-27T22:12:26+00:00`).
"""


def install(app: FastAPI) -> None:
    """Serve the API also under /v1, and describe it that way in /openapi.json."""
    app.add_middleware(VersionPrefix)

    def schema() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=DESCRIPTION,
            routes=app.routes,
        )
        components = document.setdefault("components", {})
        components["securitySchemes"] = SECURITY_SCHEMES
        components.setdefault("schemas", {}).update(COMPONENT_SCHEMAS)
        paths = {}
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                operation["security"] = [] if path in PUBLIC else ANY_AUTH
            paths[VERSION_PREFIX + path] = operations
        document["paths"] = paths
        app.openapi_schema = document
        return document

    app.openapi = schema  # type: ignore[method-assign]


class VersionPrefix:
    """`/v1/x` is served by the route `/x`: the prefix becomes the ASGI root_path, as
    if the API were mounted there, so the links it answers (`url`) say /v1 too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            rest = path[len(VERSION_PREFIX) :]
            if path.startswith(VERSION_PREFIX + "/") and rest not in NOT_VERSIONED:
                scope = {**scope, "root_path": scope.get("root_path", "") + VERSION_PREFIX}
        await self.app(scope, receive, send)
