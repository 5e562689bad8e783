"""Deleting analyses: `raiox purge` (and RAIOX_RETENTION_DAYS in the nightly
reindex) for everything older than a cut-off, and DELETE /analyses/{id} for one.

Objects go first, rows second, in one transaction per batch: if the store fails
half-way the rows stay and the next run deletes again (deleting a missing object
is a no-op). An object is removed only when no row that stays refers to it (the
store is content-addressed: the same X-ray sent twice is one object). What is
deleted is kept only as anonymous daily counts (analysis_counts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from raiox_cli import db
from raiox_cli.clinics import keys
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.store.objects import Store, open_store

BATCH = 500


@dataclass
class PurgeReport:
    older_than_s: float
    client: str | None
    dry_run: bool
    analyses: int = 0
    objects: int = 0
    public_ids: list[str] = field(default_factory=list)  # for the audit log, not printed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("public_ids")
        return data


def _unshared(conn: psycopg.Connection, rows: list[dict[str, Any]]) -> list[str]:
    """The object keys of these rows that no other row refers to."""
    keys = sorted({r["storage_key"] for r in rows if r["storage_key"]})
    ids = [r["id"] for r in rows]
    return sorted(set(keys) - queries.storage_keys_in_use(conn, keys, excluding=ids))


def purge(
    conn: psycopg.Connection,
    store: Store,
    *,
    older_than_s: float,
    clinic_id: int | None = None,
    client: str | None = None,
    dry_run: bool = False,
    batch: int = BATCH,
) -> PurgeReport:
    """Delete analyses created more than older_than_s seconds ago (of one clinic,
    or all) with their stored images; with dry_run, only count them."""
    report = PurgeReport(older_than_s, client, dry_run)
    if dry_run:
        rows = queries.old_analyses(conn, older_than_s=older_than_s, clinic_id=clinic_id)
        report.analyses = len(rows)
        report.objects = len(_unshared(conn, rows))
        conn.rollback()
        return report
    while True:
        with conn.transaction():
            rows = queries.lock_old_analyses(
                conn, older_than_s=older_than_s, clinic_id=clinic_id, limit=batch
            )
            if not rows:
                break
            for key in _unshared(conn, rows):
                store.delete(key)
                report.objects += 1
            report.analyses += queries.delete_analyses_keeping_counts(conn, [r["id"] for r in rows])
            report.public_ids.extend(str(r["public_id"]) for r in rows)
    conn.commit()
    return report


def purge_older_than(
    settings: Settings, *, older_than_s: float, clinic: str | None = None, dry_run: bool = False
) -> PurgeReport:
    """`raiox purge`: `purge` on the configured database and store, for the clinic
    named (refused when no clinic has that name) or for all."""
    with db.connect(settings) as conn:
        db.check_schema(conn)
        clinic_id = keys.find(conn, clinic)["id"] if clinic else None
        return purge(
            conn,
            open_store(settings),
            older_than_s=older_than_s,
            clinic_id=clinic_id,
            client=clinic,
            dry_run=dry_run,
        )


def delete_analysis(conn: psycopg.Connection, store: Store, analysis_id: int) -> bool:
    """Delete one analysis and its image (unless another row shares the object);
    False when it was gone already. Commits."""
    with conn.transaction():
        rows = queries.lock_analyses(conn, [analysis_id])
        if not rows:
            return False
        for key in _unshared(conn, rows):
            store.delete(key)
        queries.delete_analyses_keeping_counts(conn, [analysis_id])
    conn.commit()
    return True
