"""Objects no row refers to, and the sweep that removes them.

An object is stored before the row that names it is written (store, then record),
so an object can lose its row: an analysis deleted while its image was still
downloading, a process killed between the two steps. The sweep lists the store,
subtracts every key a row names, and removes what is left once it is older than a
grace period; younger objects may belong to a row about to be written, and are
only reported. The nightly reindex runs it; `backup --verify` reports a backup's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from raiox_cli.db import queries
from raiox_cli.store import objects as storage

DEFAULT_GRACE_S = 24 * 3600.0


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: dt.datetime  # UTC


@dataclass
class SweepReport:
    grace_s: float
    removing: bool = True
    objects: int = 0
    referenced: int = 0
    old: list[str] = field(default_factory=list)  # orphaned past the grace period
    young: list[str] = field(default_factory=list)  # orphaned, inside the grace period

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "referenced": self.referenced,
            "orphaned": len(self.old) + len(self.young),
            "removed" if self.removing else "removable": len(self.old),
            "in_grace_period": len(self.young),
            "grace_s": self.grace_s,
        }


def list_objects(store: Any) -> Iterator[StoredObject]:
    """Every raiox object in a local or S3 store (keys sha256/ab/<sha256> only)."""
    if isinstance(store, storage.S3Store):
        paginator = store.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=store.bucket, Prefix="sha256/"):
            for item in page.get("Contents", []):
                if storage.KEY.match(item["Key"]):
                    modified = item["LastModified"].astimezone(dt.timezone.utc)
                    yield StoredObject(item["Key"], int(item["Size"]), modified)
        return
    base = store.root / "sha256"
    if not base.is_dir():
        return
    for path in sorted(base.glob("*/*")):
        key = path.relative_to(store.root).as_posix()
        if storage.KEY.match(key) and path.is_file():
            stat = path.stat()
            modified = dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc)
            yield StoredObject(key, stat.st_size, modified)


def orphans(objects: Iterable[StoredObject], referenced: set[str]) -> list[StoredObject]:
    return [o for o in objects if o.key not in referenced]


def sweep(
    conn: psycopg.Connection,
    store: Any,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    remove: bool = True,
    now: dt.datetime | None = None,
) -> SweepReport:
    """Report orphaned objects; remove those older than grace_s (when remove).

    The store is listed before the referenced keys are read, so an object stored
    and recorded while the sweep runs is either referenced or listed as young."""
    report = SweepReport(grace_s, removing=remove)
    listed = list(list_objects(store))
    referenced = queries.referenced_storage_keys(conn)
    conn.rollback()
    report.objects = len(listed)
    report.referenced = sum(1 for o in listed if o.key in referenced)
    cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(seconds=grace_s)
    for item in orphans(listed, referenced):
        if item.modified > cutoff:
            report.young.append(item.key)
            continue
        if remove:
            # A row may have named it since the listing: check again, then remove.
            in_use = queries.storage_keys_in_use(conn, [item.key], excluding=[])
            conn.rollback()
            if in_use:
                continue
            store.delete(item.key)
        report.old.append(item.key)
    return report
