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
ENGINES = ("local", "ray")


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


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Field metadata names the environment variable."""

    home: Path = field(metadata={"env": "RAIOX_HOME"})
    database_url: str | None = field(default=None, metadata={"env": "RAIOX_DATABASE_URL"})
    model: str = field(default=DEFAULT_MODEL, metadata={"env": "RAIOX_MODEL"})
    pretrained: str = field(default=DEFAULT_PRETRAINED, metadata={"env": "RAIOX_PRETRAINED"})
    weights: Path | None = field(default=None, metadata={"env": "RAIOX_WEIGHTS"})
    device: str = field(default="auto", metadata={"env": "RAIOX_DEVICE"})
    # Who runs the model: ONNX Runtime (CPU, no torch import) or torch; auto picks
    # ONNX Runtime on a CPU and torch on a CUDA GPU (README, "Inference backends").
    backend: str = field(default="auto", metadata={"env": "RAIOX_BACKEND"})
    batch_size: int = field(default=32, metadata={"env": "RAIOX_BATCH_SIZE"})
    workers: int = field(default=0, metadata={"env": "RAIOX_WORKERS"})
    max_pixels: int = field(default=80_000_000, metadata={"env": "RAIOX_MAX_PIXELS"})
    max_bytes: int = field(default=100 * 1024 * 1024, metadata={"env": "RAIOX_MAX_BYTES"})
    ef_search: int = field(default=100, metadata={"env": "RAIOX_EF_SEARCH"})
    min_score: float = field(default=0.8, metadata={"env": "RAIOX_MIN_SCORE"})
    # Search the query mirrored and upside down too (see README, "Searching").
    tta: bool = field(default=True, metadata={"env": "RAIOX_TTA"})
    # Who schedules the read -> decode -> embed -> write stages: threads here, or Ray
    # Data (README, "A Ray cluster"). RAY_ADDRESS is Ray's own variable.
    engine: str = field(default="local", metadata={"env": "RAIOX_ENGINE"})
    ray_address: str | None = field(default=None, metadata={"env": "RAY_ADDRESS"})
    ray_actors: int = field(default=0, metadata={"env": "RAIOX_RAY_ACTORS"})  # 0: one per GPU
    ray_gpus_per_actor: float = field(default=1.0, metadata={"env": "RAIOX_RAY_GPUS_PER_ACTOR"})
    s3_bucket: str | None = field(default=None, metadata={"env": "RAIOX_S3_BUCKET"})
    s3_endpoint: str | None = field(default=None, metadata={"env": "RAIOX_S3_ENDPOINT"})
    s3_region: str | None = field(default=None, metadata={"env": "RAIOX_S3_REGION"})
    debug: bool = field(default=False, metadata={"env": "RAIOX_DEBUG"})
    # Off: raiox switches off its dependencies' usage reporting (ONNX Runtime, Ray,
    # Hugging Face hub) at process start; 1 leaves their own settings alone (lifecycle.py).
    third_party_telemetry: bool = field(
        default=False, metadata={"env": "RAIOX_THIRD_PARTY_TELEMETRY"}
    )
    # --- webhook server (serve-webhook-minimal). Secrets: no defaults, never in repr.
    webhook_token: str | None = field(
        default=None, repr=False, metadata={"env": "RAIOX_WEBHOOK_TOKEN"}
    )
    webhook_secret: str | None = field(
        default=None, repr=False, metadata={"env": "RAIOX_WEBHOOK_SECRET"}
    )
    notify_url: str | None = field(default=None, repr=False, metadata={"env": "RAIOX_NOTIFY_URL"})
    notify_secret: str | None = field(
        default=None, repr=False, metadata={"env": "RAIOX_NOTIFY_SECRET"}
    )
    jotform_form_ids: str | None = field(default=None, metadata={"env": "RAIOX_JOTFORM_FORM_IDS"})
    jotform_client_field: str = field(
        default="clientId", metadata={"env": "RAIOX_JOTFORM_CLIENT_FIELD"}
    )
    jotform_upload_field: str | None = field(
        default=None, metadata={"env": "RAIOX_JOTFORM_UPLOAD_FIELD"}
    )
    download_allow_loopback: bool = field(
        default=False, metadata={"env": "RAIOX_DOWNLOAD_ALLOW_LOOPBACK"}
    )
    download_allow_hosts: str | None = field(
        default=None, metadata={"env": "RAIOX_DOWNLOAD_ALLOW_HOSTS"}
    )
    download_deadline_s: float = field(default=30.0, metadata={"env": "RAIOX_DOWNLOAD_DEADLINE_S"})
    server_max_bytes: int = field(
        default=25 * 1024 * 1024, metadata={"env": "RAIOX_SERVER_MAX_BYTES"}
    )
    job_max_attempts: int = field(default=5, metadata={"env": "RAIOX_JOB_MAX_ATTEMPTS"})
    job_lease_s: float = field(default=300.0, metadata={"env": "RAIOX_JOB_LEASE_S"})
    job_retry_base_s: float = field(default=2.0, metadata={"env": "RAIOX_JOB_RETRY_BASE_S"})
    link_expires_s: int = field(default=3600, metadata={"env": "RAIOX_LINK_EXPIRES_S"})
    # --- clinics and privacy (README "Clinics, keys and patient data")
    # Signs result links (/r/<token>); unset: a random key kept in RAIOX_HOME/secret.key.
    secret_key: str | None = field(default=None, repr=False, metadata={"env": "RAIOX_SECRET_KEY"})
    result_link_expires_s: int = field(
        default=7 * 24 * 3600, metadata={"env": "RAIOX_RESULT_LINK_EXPIRES_S"}
    )
    # Failed authentications a source address may make per window before it gets 429.
    auth_max_failures: int = field(default=20, metadata={"env": "RAIOX_AUTH_MAX_FAILURES"})
    auth_failure_window_s: float = field(
        default=600.0, metadata={"env": "RAIOX_AUTH_FAILURE_WINDOW_S"}
    )
    # A shared Jotform form: its client field's answer names the clinic (needs the
    # RAIOX_JOTFORM_FORM_IDS allow-list; README says what this trusts).
    jotform_clinic_from_answer: bool = field(
        default=False, metadata={"env": "RAIOX_JOTFORM_CLINIC_FROM_ANSWER"}
    )
    # Nightly reindex purges analyses older than this many days (unset: keep all).
    retention_days: int | None = field(default=None, metadata={"env": "RAIOX_RETENTION_DAYS"})
    metrics_port: int = field(default=0, metadata={"env": "RAIOX_METRICS_PORT"})
    metrics_host: str = field(default="127.0.0.1", metadata={"env": "RAIOX_METRICS_HOST"})
    health_stuck_s: float = field(default=900.0, metadata={"env": "RAIOX_HEALTH_STUCK_S"})
    # --- pages and e-mail (server/pages.py, server/notify.py)
    # The address people reach the server at (https://raiox.example.com): links in
    # e-mails and in webhook notifications start with it.
    public_url: str | None = field(default=None, metadata={"env": "RAIOX_PUBLIC_URL"})
    default_lang: str = field(default="pt-BR", metadata={"env": "RAIOX_LANG"})
    # "strong match" needs the best score >= min_score AND this lead over the next implant.
    min_margin: float = field(default=0.02, metadata={"env": "RAIOX_MIN_MARGIN"})
    smtp_url: str | None = field(default=None, repr=False, metadata={"env": "RAIOX_SMTP_URL"})
    smtp_from: str | None = field(default=None, metadata={"env": "RAIOX_SMTP_FROM"})
    smtp_cafile: Path | None = field(default=None, metadata={"env": "RAIOX_SMTP_CAFILE"})
    jotform_email_field: str = field(default="email", metadata={"env": "RAIOX_JOTFORM_EMAIL_FIELD"})

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
