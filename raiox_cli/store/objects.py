"""Where image bytes live: a local folder (default) or S3-compatible storage.

Objects are content-addressed (`sha256/ab/abcdef...`), so a put is idempotent and
the same bytes are stored once. Objects are private: the local folder is owner-
only, S3 objects get no ACL (a bucket's default is private) and are shared only
through short-lived presigned URLs.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raiox_cli.config import Settings
from raiox_cli.errors import RaioxError
from raiox_cli.files import atomic_write
from raiox_cli.images import check_size, sniff_format

if TYPE_CHECKING:
    from botocore.client import BaseClient

SHA256 = re.compile(r"^[0-9a-f]{64}$")
KEY = re.compile(r"^sha256/[0-9a-f]{2}/[0-9a-f]{64}$")
S3_ATTEMPTS = 5  # botocore "standard" retries: exponential backoff with jitter


class StorageError(RaioxError):
    """An object could not be stored or read (after retries)."""


class ObjectNotFound(StorageError):
    pass


def object_key(sha256: str) -> str:
    if not SHA256.match(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    return f"sha256/{sha256[:2]}/{sha256}"


def _check_key(key: str) -> str:
    # Keys come back from the database; refusing anything else keeps a bad row from
    # turning into a path outside the store.
    if not KEY.match(key):
        raise ValueError(f"not a raiox object key: {key!r}")
    return key


def _verified_key(sha256: str, data: bytes) -> str:
    key = object_key(sha256)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise StorageError(f"{key}: the bytes hash to {actual}, not to their key")
    return key


class Store(Protocol):
    def put(self, sha256: str, data: bytes, *, content_type: str | None = None) -> str: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str, expires_s: int = 3600) -> str: ...
    def describe(self) -> str: ...


class LocalStore:
    """Objects as files under one folder (RAIOX_HOME/objects by default)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, sha256: str, data: bytes, *, content_type: str | None = None) -> str:
        key = _verified_key(sha256, data)
        path = self._path(key)
        if path.is_file() and path.stat().st_size == len(data):
            return key
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Write then rename: a crash never leaves a half-written object under its key.
            atomic_write(path, lambda fh: fh.write(data), mode=0o600, durable=False)
        except OSError as exc:
            raise StorageError(f"{path}: cannot store ({exc.strerror or exc})") from exc
        return key

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} is not in the store {self.root}") from None
        except OSError as exc:
            raise StorageError(f"{path}: cannot read ({exc.strerror or exc})") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove an object; one already gone is not an error (purge is re-run)."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"{path}: cannot delete ({exc.strerror or exc})") from exc

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self._path(key).resolve().as_uri()

    def describe(self) -> str:
        return f"local folder {self.root}"


class S3Store:
    """Objects in an S3-compatible bucket (AWS S3, DigitalOcean Spaces, MinIO)."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        attempts: int = S3_ATTEMPTS,
        client: BaseClient | None = None,
    ):
        self.bucket = bucket
        self.endpoint = endpoint
        self.region = region
        self.attempts = attempts
        self.client = client or _s3_client(endpoint, region, attempts)

    def __reduce__(self) -> tuple[Any, ...]:
        # A store travels to other processes (Ray workers) as its settings; each
        # process opens its own client with its own credentials.
        return (_reopen_s3_store, (self.bucket, self.endpoint, self.region, self.attempts))

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        return StorageError(
            f"s3://{self.bucket}/{key}: {action} failed after {self.attempts} attempts: {exc}"
        )

    def put(self, sha256: str, data: bytes, *, content_type: str | None = None) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        key = _verified_key(sha256, data)
        content_type = content_type or _content_type(data)
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        try:
            # No ACL argument: objects inherit the bucket's private default.
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", key, exc) from exc
        return key

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_key(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _status(exc) == 404:
                raise ObjectNotFound(f"s3://{self.bucket}/{key} does not exist") from None
            raise self._fail("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise self._fail("head", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head", key, exc) from exc
        return True

    def delete(self, key: str) -> None:
        """Remove an object; S3 answers a missing key with success too."""
        from botocore.exceptions import BotoCoreError, ClientError

        _check_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("delete", key, exc) from exc

    def url(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET link that stops working after `expires_s` seconds."""
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": _check_key(key)},
            ExpiresIn=expires_s,
        )

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}{where}"


def _reopen_s3_store(
    bucket: str, endpoint: str | None, region: str | None, attempts: int
) -> S3Store:
    return S3Store(bucket, endpoint=endpoint, region=region, attempts=attempts)


def _content_type(data: bytes) -> str | None:
    fmt = sniff_format(data[:256])
    return {
        "JPEG": "image/jpeg",
        "PNG": "image/png",
        "TIFF": "image/tiff",
        "BMP": "image/bmp",
        "WEBP": "image/webp",
        "DICOM": "application/dicom",
    }.get(fmt or "")


def _status(exc: Exception) -> int | None:
    return getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def _s3_client(endpoint: str | None, region: str | None, attempts: int) -> BaseClient:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        signature_version="s3v4",
        # S3-compatible services (Spaces, MinIO) may not accept the newer default
        # checksum headers; send them only where the API requires them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # Credentials come from boto3's usual chain (AWS_* variables, ~/.aws, roles).
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


# --- catalogue files in a bucket (an s3://bucket/prefix catalogue root) ----------------

_clients: dict[tuple[str | None, str | None], BaseClient] = {}
_clients_lock = threading.Lock()


def _shared_client(endpoint: str | None, region: str | None) -> BaseClient:
    """One client per endpoint and process: clients are thread-safe, but creating
    them from boto3's default session is not, and each costs milliseconds."""
    with _clients_lock:
        if (endpoint, region) not in _clients:
            _clients[endpoint, region] = _s3_client(endpoint, region, S3_ATTEMPTS)
        return _clients[endpoint, region]


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Bucket:
    """A bucket read through the storage settings' endpoint and region. Plain data:
    it travels to other processes (Ray workers), which open their own client with
    their own credentials (boto3's usual chain)."""

    name: str
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_settings(cls, name: str, settings: Settings) -> Bucket:
        return cls(name, settings.s3_endpoint, settings.s3_region)

    @property
    def client(self) -> BaseClient:
        return _shared_client(self.endpoint, self.region)

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return StorageError(f"s3://{self.name}/{key}{where}: {action} failed: {exc}")

    def list(self, prefix: str) -> Iterator[S3Object]:
        """Every object under `prefix`, in key order."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    mtime_ns = int(obj["LastModified"].timestamp()) * 1_000_000_000
                    yield S3Object(obj["Key"], int(obj["Size"]), mtime_ns)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc

    def read(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes; refused unread when it is over `max_bytes`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.name, Key=key)
            check_size(int(response["ContentLength"]), max_bytes)
            return response["Body"].read()
        except ClientError as exc:
            if _status(exc) == 404:
                raise ObjectNotFound(f"s3://{self.name}/{key} does not exist") from None
            raise self._fail("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("get", key, exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.name, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise self._fail("head", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head", key, exc) from exc
        return True


def open_store(settings: Settings) -> Store:
    """The configured store: S3 when RAIOX_S3_BUCKET is set, else the local folder."""
    if settings.s3_bucket:
        return S3Store(settings.s3_bucket, endpoint=settings.s3_endpoint, region=settings.s3_region)
    return LocalStore(settings.storage_dir)
