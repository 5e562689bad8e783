"""The one place settings are resolved: command-line option > RAIOX_* env > default."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raiox_cli.errors import UsageError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "onnx")
# fp32; int8 (ONNX Runtime, CPU: the image tower quantised behind a parity gate);
# fp16/bf16 (torch on a CUDA GPU, autocast); auto: int8 on a CPU when the gate
# passes, else fp32, and fp16 on a CUDA GPU.
PRECISIONS = ("fp32", "int8", "fp16", "bf16", "auto")
ENGINES = ("local", "ray")


# The sections of the configuration reference (docs/reference/configuration.md).
HOME = "Home, database and process"
MODEL = "Model"
SEARCH = "Images, ingest and search"
RAY = "Ray engine"
S3 = "Image store (S3)"
SERVER = "Server: authentication and notifications"
DOWNLOADS = "Server: downloads"
JOBS = "Server: jobs and links"
CLINICS = "Clinics and privacy"
HEALTH = "Metrics and health"
PAGES = "Pages and e-mail"


def _default_home() -> str:
    import platformdirs

    return platformdirs.user_data_dir("raiox", appauthor=False)


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """RAIOX_HOME resolved as resolve() does, for code that needs only the home folder
    (the embedding module's caches) and must not fail on unrelated settings."""
    env = os.environ if env is None else env
    raw = env.get("RAIOX_HOME", "")
    return Path(raw).expanduser() if raw else Path(_default_home())


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer") from None


def setting(env: str, group: str, help: str, default_doc: str | None = None) -> dict[str, str]:
    """A field's metadata: its environment variable, and what the configuration
    reference (docs/gen.py) says about it; `default_doc` words a default that is not a
    plain value (a platform folder, "unset: ...")."""
    meta = {"env": env, "group": group, "help": help}
    if default_doc is not None:
        meta["default_doc"] = default_doc
    return meta


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Each field's metadata names its environment variable and says
    what it means: docs/reference/configuration.md is generated from it."""

    home: Path = field(
        metadata=setting(
            "RAIOX_HOME",
            HOME,
            "the embedded database (`pgdata/`), the local image store (`objects/`), caches and the"
            " ONNX exports",
            default_doc="platform user data dir (`~/.local/share/raiox`)",
        )
    )
    database_url: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_DATABASE_URL",
            HOME,
            "`postgresql://user@host/db` of an external server (pgvector installed there); unset: "
            "the embedded server",
            default_doc="unset: embedded server",
        ),
    )
    model: str = field(
        default=DEFAULT_MODEL, metadata=setting("RAIOX_MODEL", MODEL, "open_clip model name")
    )
    pretrained: str = field(
        default=DEFAULT_PRETRAINED,
        metadata=setting(
            "RAIOX_PRETRAINED",
            MODEL,
            "open_clip pretrained tag; `none` = random weights (speed tests only: results "
            "meaningless)",
        ),
    )
    weights: Path | None = field(
        default=None,
        metadata=setting(
            "RAIOX_WEIGHTS",
            MODEL,
            "a local checkpoint file (air-gapped machines); the model id becomes "
            "`<arch>:file:<sha256 prefix>`",
        ),
    )
    device: str = field(
        default="auto",
        metadata=setting("RAIOX_DEVICE", MODEL, "`auto` (CUDA when present), `cpu` or `cuda`"),
    )
    # Who runs the model: ONNX Runtime (CPU, no torch import) or torch; auto picks
    # ONNX Runtime on a CPU and torch on a CUDA GPU (docs/guides/backends.md).
    backend: str = field(
        default="auto",
        metadata=setting(
            "RAIOX_BACKEND",
            MODEL,
            "who runs the model: `onnx` (ONNX Runtime on the CPU, no torch import), `torch`, or "
            "`auto` (ONNX Runtime on a CPU, torch on a CUDA GPU)",
        ),
    )
    precision: str = field(
        default="fp32",
        metadata=setting(
            "RAIOX_PRECISION",
            MODEL,
            "the model's numbers: `fp32`; `int8` (ONNX Runtime on a CPU, the image tower "
            "quantised behind a parity gate; part of the model id, `...@int8`); `fp16` or "
            "`bf16` (torch autocast on a CUDA GPU); `auto` (int8 where the gate lets it, else "
            "fp32; fp16 on a CUDA GPU)",
        ),
    )
    batch_size: int = field(
        default=32,
        metadata=setting("RAIOX_BATCH_SIZE", SEARCH, "images per model batch"),
    )
    workers: int = field(
        default=0,
        metadata=setting(
            "RAIOX_WORKERS",
            SEARCH,
            "decode workers for ingest and batch search; `0` = the CPU count",
        ),
    )
    max_pixels: int = field(
        default=80_000_000,
        metadata=setting(
            "RAIOX_MAX_PIXELS",
            SEARCH,
            "refuse larger images (decompression bombs), checked from the header",
        ),
    )
    max_bytes: int = field(
        default=100 * 1024 * 1024,
        metadata=setting(
            "RAIOX_MAX_BYTES",
            SEARCH,
            "refuse larger files, checked before reading",
        ),
    )
    ef_search: int = field(
        default=100,
        metadata=setting("RAIOX_EF_SEARCH", SEARCH, "pgvector `hnsw.ef_search` for queries"),
    )
    min_score: float = field(
        default=0.8,
        metadata=setting(
            "RAIOX_MIN_SCORE",
            SEARCH,
            'below this best score, search says "no confident match"',
        ),
    )
    # Search the query mirrored and upside down too (docs/guides/searching.md).
    tta: bool = field(
        default=True,
        metadata=setting(
            "RAIOX_TTA",
            SEARCH,
            "search the query also mirrored and upside down (`--tta/--no-tta`)",
        ),
    )
    # Who schedules the read -> decode -> embed -> write stages: threads here, or Ray
    # Data (docs/guides/backends.md). RAY_ADDRESS is Ray's own variable.
    engine: str = field(
        default="local",
        metadata=setting(
            "RAIOX_ENGINE",
            RAY,
            "who runs ingest's read -> decode -> embed -> write stages: `local` (threads) or `ray`"
            " (Ray Data)",
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=setting(
            "RAY_ADDRESS",
            RAY,
            "with `--engine ray`, the cluster to join (`--ray-address`, Ray's own variable)",
            default_doc="unset: start a local Ray",
        ),
    )
    ray_actors: int = field(
        default=0,
        metadata=setting(
            "RAIOX_RAY_ACTORS",
            RAY,
            "model actors of the Ray engine; `0` = one per GPU, or one per two CPUs",
        ),
    )  # 0: one per GPU
    ray_gpus_per_actor: float = field(
        default=1.0,
        metadata=setting(
            "RAIOX_RAY_GPUS_PER_ACTOR",
            RAY,
            "GPUs per model actor; a fraction such as `0.5` shares a GPU",
        ),
    )
    s3_bucket: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_S3_BUCKET",
            S3,
            "keep images in this S3 / DigitalOcean Spaces bucket instead of `RAIOX_HOME/objects` "
            "(credentials from the usual `AWS_*` variables)",
        ),
    )
    s3_endpoint: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_S3_ENDPOINT",
            S3,
            "the S3 endpoint URL (e.g. `https://nyc3.digitaloceanspaces.com`); also used to read "
            "`s3://` catalogues",
        ),
    )
    s3_region: str | None = field(
        default=None, metadata=setting("RAIOX_S3_REGION", S3, "the S3 region")
    )
    debug: bool = field(
        default=False,
        metadata=setting("RAIOX_DEBUG", HOME, "`1` shows tracebacks and debug logs"),
    )
    # Off: raiox switches off its dependencies' usage reporting (ONNX Runtime, Ray,
    # Hugging Face hub) at process start; 1 leaves their own settings alone (lifecycle.py).
    third_party_telemetry: bool = field(
        default=False,
        metadata=setting(
            "RAIOX_THIRD_PARTY_TELEMETRY",
            HOME,
            "`1` leaves the usage reporting of raiox's dependencies (ONNX Runtime, Ray, the"
            " Hugging Face hub) to their own settings; unset, raiox switches it off at start",
        ),
    )
    # --- webhook server (serve-webhook-minimal). Secrets: no defaults, never in repr.
    webhook_token: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "RAIOX_WEBHOOK_TOKEN",
            SERVER,
            "the operator's shared token, required on every endpoint but `/healthcheck` and "
            "`/docs`",
        ),
    )
    webhook_secret: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "RAIOX_WEBHOOK_SECRET",
            SERVER,
            "Standard Webhooks signing secret that JSON deliveries must be signed with",
        ),
    )
    notify_url: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "RAIOX_NOTIFY_URL",
            SERVER,
            "where to POST every finished analysis (signed)",
        ),
    )
    notify_secret: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "RAIOX_NOTIFY_SECRET",
            SERVER,
            "the key that signs notifications (else `RAIOX_WEBHOOK_SECRET`)",
        ),
    )
    jotform_form_ids: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_JOTFORM_FORM_IDS",
            SERVER,
            "comma-separated Jotform form ids accepted with the operator token (others: 403)",
            default_doc="unset: any form",
        ),
    )
    jotform_client_field: str = field(
        default="clientId",
        metadata=setting(
            "RAIOX_JOTFORM_CLIENT_FIELD",
            SERVER,
            "the form answer (`q<N>_<field>`) holding the client id",
        ),
    )
    jotform_upload_field: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_JOTFORM_UPLOAD_FIELD",
            SERVER,
            "the form's file-upload field holding the X-ray",
            default_doc="unset: the first upload",
        ),
    )
    download_allow_loopback: bool = field(
        default=False,
        metadata=setting(
            "RAIOX_DOWNLOAD_ALLOW_LOOPBACK",
            DOWNLOADS,
            "allow downloads from 127.0.0.0/8 and ::1 (tests only)",
        ),
    )
    download_allow_hosts: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_DOWNLOAD_ALLOW_HOSTS",
            DOWNLOADS,
            "hosts images may be downloaded from (a leading dot: the domain and its subdomains)",
            default_doc="unset: any public host",
        ),
    )
    download_deadline_s: float = field(
        default=30.0,
        metadata=setting(
            "RAIOX_DOWNLOAD_DEADLINE_S", DOWNLOADS, "whole-download time limit, seconds"
        ),
    )
    server_max_bytes: int = field(
        default=25 * 1024 * 1024,
        metadata=setting(
            "RAIOX_SERVER_MAX_BYTES", DOWNLOADS, "request body and download cap, bytes"
        ),
    )
    job_max_attempts: int = field(
        default=5,
        metadata=setting("RAIOX_JOB_MAX_ATTEMPTS", JOBS, "attempts of a job before it fails"),
    )
    job_lease_s: float = field(
        default=300.0,
        metadata=setting(
            "RAIOX_JOB_LEASE_S",
            JOBS,
            "a worker's lease on a job, seconds; a killed server's jobs are taken again after it",
        ),
    )
    job_retry_base_s: float = field(
        default=2.0,
        metadata=setting(
            "RAIOX_JOB_RETRY_BASE_S",
            JOBS,
            "first retry delay of jobs and notifications, seconds (doubling)",
        ),
    )
    link_expires_s: int = field(
        default=3600,
        metadata=setting(
            "RAIOX_LINK_EXPIRES_S",
            JOBS,
            "lifetime of presigned links to stored images, seconds",
        ),
    )
    # --- clinics and privacy (docs/guides/clinics.md)
    # Signs result links (/r/<token>); unset: a random key kept in RAIOX_HOME/secret.key.
    secret_key: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "RAIOX_SECRET_KEY",
            CLINICS,
            "signs result links (`/r/<token>`) and seeds DICOM UID replacement; set the same value"
            " on every server behind one nginx",
            default_doc="unset: random, kept in `RAIOX_HOME/secret.key`",
        ),
    )
    result_link_expires_s: int = field(
        default=7 * 24 * 3600,
        metadata=setting(
            "RAIOX_RESULT_LINK_EXPIRES_S",
            CLINICS,
            "lifetime of a signed result link, seconds (7 days)",
        ),
    )
    # Failed authentications a source address may make per window before it gets 429.
    auth_max_failures: int = field(
        default=20,
        metadata=setting(
            "RAIOX_AUTH_MAX_FAILURES",
            CLINICS,
            "failed authentications per source address and window before 429",
        ),
    )
    auth_failure_window_s: float = field(
        default=600.0,
        metadata=setting(
            "RAIOX_AUTH_FAILURE_WINDOW_S",
            CLINICS,
            "the window of `RAIOX_AUTH_MAX_FAILURES`, seconds",
        ),
    )
    # A shared Jotform form: its client field's answer names the clinic (needs the
    # RAIOX_JOTFORM_FORM_IDS allow-list; docs/guides/clinics.md says what this trusts).
    jotform_clinic_from_answer: bool = field(
        default=False,
        metadata=setting(
            "RAIOX_JOTFORM_CLINIC_FROM_ANSWER",
            CLINICS,
            "shared form: the client field's answer names the clinic (needs "
            "`RAIOX_JOTFORM_FORM_IDS`)",
        ),
    )
    # Nightly reindex purges analyses older than this many days (unset: keep all).
    retention_days: int | None = field(
        default=None,
        metadata=setting(
            "RAIOX_RETENTION_DAYS",
            CLINICS,
            "`raiox reindex` purges analyses older than this many days",
            default_doc="unset: keep everything",
        ),
    )
    # An object is stored before its row is written; younger orphans may still get one.
    orphan_grace_s: float = field(
        default=86400.0,
        metadata=setting(
            "RAIOX_ORPHAN_GRACE_S",
            CLINICS,
            "`raiox reindex` removes stored images no row refers to once they are older than"
            " this many seconds (younger ones are only reported)",
        ),
    )
    metrics_port: int = field(
        default=0,
        metadata=setting(
            "RAIOX_METRICS_PORT",
            HEALTH,
            "serve `/metrics` unauthenticated on this separate port; `0` = off",
        ),
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=setting("RAIOX_METRICS_HOST", HEALTH, "the address the metrics port binds to"),
    )
    health_stuck_s: float = field(
        default=900.0,
        metadata=setting(
            "RAIOX_HEALTH_STUCK_S",
            HEALTH,
            "`/healthcheck` answers 503 when a due job has waited longer, seconds",
        ),
    )
    # --- pages and e-mail (server/routes/pages.py, server/notify.py)
    # The address people reach the server at (https://raiox.example.com): links in
    # e-mails and in webhook notifications start with it.
    public_url: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_PUBLIC_URL",
            PAGES,
            "the server's public address; links in e-mails and notifications start with it "
            "(without it they carry none)",
        ),
    )
    default_lang: str = field(
        default="pt-BR",
        metadata=setting(
            "RAIOX_LANG",
            PAGES,
            "language of e-mails, pages and contact sheets when none was chosen: `pt-BR` or `en`",
        ),
    )
    timezone: str = field(
        default="UTC",
        metadata=setting(
            "RAIOX_TIMEZONE",
            PAGES,
            "IANA time zone of the times on pages and in e-mails, for clinics without "
            "their own (`raiox clinics update NAME --timezone`); the API stays UTC",
        ),
    )
    # "strong match" needs the best score >= min_score AND this lead over the next implant.
    min_margin: float = field(
        default=0.02,
        metadata=setting(
            "RAIOX_MIN_MARGIN",
            PAGES,
            'lead over the next implant that makes a "strong match"',
        ),
    )
    smtp_url: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "RAIOX_SMTP_URL",
            PAGES,
            "e-mail server: `smtp://` (STARTTLS), `smtps://` (TLS), `?tls=none` (a trusted relay)",
        ),
    )
    smtp_from: str | None = field(
        default=None,
        metadata=setting(
            "RAIOX_SMTP_FROM",
            PAGES,
            "sender of e-mails, e.g. `raiox <raiox@clinic.example>`",
        ),
    )
    smtp_cafile: Path | None = field(
        default=None,
        metadata=setting(
            "RAIOX_SMTP_CAFILE",
            PAGES,
            "a private CA for the SMTP server's certificate",
        ),
    )
    jotform_email_field: str = field(
        default="email",
        metadata=setting(
            "RAIOX_JOTFORM_EMAIL_FIELD",
            PAGES,
            "the form answer holding the submitter's e-mail address",
        ),
    )

    @property
    def storage_dir(self) -> Path:
        return self.home / "objects"

    @property
    def pgdata_dir(self) -> Path:
        return self.home / "pgdata"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def for_workers(self) -> Settings:
        """These settings without the database URL and the secrets: what may travel
        to other processes (Ray workers), which read and decode but never write."""
        hidden = {f.name: None for f in dataclasses.fields(self) if not f.repr}
        return dataclasses.replace(self, database_url=None, **hidden)


def _convert(f: dataclasses.Field, raw: Any) -> Any:
    name = f.metadata["env"]
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if raw is None:
        return None
    if isinstance(raw, str):
        if "Path" in kind:
            return Path(raw).expanduser()
        if kind in ("int", "int | None"):
            return _int(name, raw)
        if kind == "float":
            try:
                return float(raw)
            except ValueError:
                raise UsageError(f"{name}={raw!r} is not a number") from None
        if kind == "bool":
            return _bool(raw)
    return raw


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, what: str = "duration") -> float:
    """'90d', '24h', '30m', '45s', '2w' -> seconds."""
    value = text.strip().lower()
    number, unit = value[:-1], value[-1:]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in DURATION_UNITS or amount < 0:
        raise UsageError(
            f"{what} {text!r} is not a duration; write a number and a unit: 90d, 24h, 30m, 45s"
        )
    return amount * DURATION_UNITS[unit]


def resolve(env: Mapping[str, str] | None = None, **options: Any) -> Settings:
    """Build Settings. `options` are command-line values; None means "not given"."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        option = options.pop(f.name, None)
        if option is not None:
            values[f.name] = _convert(f, option) if isinstance(option, str) else option
        elif env.get(f.metadata["env"], "") != "":
            values[f.name] = _convert(f, env[f.metadata["env"]])
    if options:
        raise TypeError(f"unknown settings: {sorted(options)}")
    values.setdefault("home", home_dir(env))
    settings = Settings(**values)
    if settings.device not in DEVICES:
        raise UsageError(f"device {settings.device!r} is not one of {', '.join(DEVICES)}")
    if settings.backend not in BACKENDS:
        raise UsageError(f"RAIOX_BACKEND={settings.backend!r} is not one of {', '.join(BACKENDS)}")
    if settings.precision not in PRECISIONS:
        raise UsageError(
            f"RAIOX_PRECISION={settings.precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if settings.engine not in ENGINES:
        raise UsageError(f"engine {settings.engine!r} is not one of {', '.join(ENGINES)}")
    if not 0 < settings.ray_gpus_per_actor <= 64 or settings.ray_actors < 0:
        raise UsageError(
            "RAIOX_RAY_GPUS_PER_ACTOR must be above 0 (0.5: two model actors per GPU) "
            "and RAIOX_RAY_ACTORS at least 0 (0: one per GPU, or per two CPUs)"
        )
    if settings.batch_size < 1:
        raise UsageError("batch size must be at least 1 (--batch-size / RAIOX_BATCH_SIZE)")
    return settings
