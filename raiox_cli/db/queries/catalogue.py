"""The catalogue: implants, images, embeddings; ingest, reindex and the writer lock."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from raiox_cli.db.queries.models import ModelRow
from raiox_cli.db.queries.schema import WRITER_LOCK

# --- catalogue ---------------------------------------------------------------


def upsert_implant(conn: psycopg.Connection, implant: dict[str, Any]) -> int:
    """Insert or update an implant by its stable key; returns its id."""
    row = conn.execute(
        """INSERT INTO implants (key, name, manufacturer, system, diameter_mm, length_mm,
                                 connection, notes, extra)
           VALUES (%(key)s, %(name)s, %(manufacturer)s, %(system)s, %(diameter_mm)s,
                   %(length_mm)s, %(connection)s, %(notes)s, %(extra)s)
           ON CONFLICT (key) DO UPDATE SET
               name = excluded.name, manufacturer = excluded.manufacturer,
               system = excluded.system, diameter_mm = excluded.diameter_mm,
               length_mm = excluded.length_mm, connection = excluded.connection,
               notes = excluded.notes, extra = excluded.extra,
               updated_at = CASE WHEN (implants.name, implants.manufacturer, implants.system,
                                       implants.diameter_mm, implants.length_mm,
                                       implants.connection, implants.notes, implants.extra)
                                      IS DISTINCT FROM
                                      (excluded.name, excluded.manufacturer, excluded.system,
                                       excluded.diameter_mm, excluded.length_mm,
                                       excluded.connection, excluded.notes, excluded.extra)
                                 THEN now() ELSE implants.updated_at END
           RETURNING id""",
        {
            "system": None,
            "diameter_mm": None,
            "length_mm": None,
            "connection": None,
            "notes": None,
            **implant,
            "extra": psycopg.types.json.Jsonb(implant.get("extra") or {}),
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def upsert_image(conn: psycopg.Connection, image: dict[str, Any]) -> int:
    """Insert or refresh one reference image of an implant; returns its id."""
    row = conn.execute(
        """INSERT INTO implant_images (implant_id, sha256, root_id, source_path, file_size,
                                       file_mtime_ns, storage_key, format, width, height)
           VALUES (%(implant_id)s, %(sha256)s, %(root_id)s, %(source_path)s, %(file_size)s,
                   %(file_mtime_ns)s, %(storage_key)s, %(format)s, %(width)s, %(height)s)
           ON CONFLICT (implant_id, sha256) DO UPDATE SET
               root_id = excluded.root_id, source_path = excluded.source_path,
               file_size = excluded.file_size, file_mtime_ns = excluded.file_mtime_ns,
               storage_key = coalesce(excluded.storage_key, implant_images.storage_key),
               format = excluded.format, width = excluded.width, height = excluded.height,
               updated_at = now()
           RETURNING id""",
        {
            "root_id": None,
            "source_path": None,
            "file_size": None,
            "file_mtime_ns": None,
            "storage_key": None,
            "format": None,
            "width": None,
            "height": None,
            **image,
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def copy_embeddings(
    conn: psycopg.Connection, model_id: str, rows: Iterable[tuple[int, np.ndarray]]
) -> int:
    """Bulk-write (image_id, vector) pairs for a model: binary COPY into a temp
    table, then one upsert, so a re-run of the same batch is harmless."""
    conn.execute(
        """CREATE TEMP TABLE IF NOT EXISTS embeddings_load
               (image_id bigint, embedding vector) ON COMMIT DELETE ROWS"""
    )
    count = 0
    with conn.cursor().copy(
        "COPY embeddings_load (image_id, embedding) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "vector"])
        for image_id, vector in rows:
            copy.write_row((image_id, np.asarray(vector, dtype=np.float32)))
            count += 1
    conn.execute(
        """INSERT INTO image_embeddings (image_id, model_id, embedding)
           SELECT image_id, %(m)s, embedding FROM embeddings_load
           ON CONFLICT (image_id, model_id) DO UPDATE SET embedding = excluded.embedding,
                                                          created_at = now()""",
        {"m": model_id},
    )
    conn.execute("TRUNCATE embeddings_load")
    return count


def count_embeddings(conn: psycopg.Connection, model_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM image_embeddings WHERE model_id = %(m)s", {"m": model_id}
    ).fetchone()
    return int(row[0]) if row else 0


# --- catalogue ingest, reindex, model switch and the writer lock (ingest.py) --------


def set_application_name(conn: psycopg.Connection, name: str) -> None:
    """Shown in pg_stat_activity, so a second writer can name who holds the lock."""
    conn.execute("SELECT set_config('application_name', %(n)s, false)", {"n": name})


def try_writer_lock(conn: psycopg.Connection) -> bool:
    """Take the session-level writer lock if free (released when the session ends,
    so a killed writer never leaves it behind)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%(k)s)", {"k": WRITER_LOCK}).fetchone()
    return bool(row and row[0])


def wait_writer_lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_lock(%(k)s)", {"k": WRITER_LOCK})


def release_writer_lock(conn: psycopg.Connection) -> None:
    """Release it now: closing the session releases it too, but only once the
    server's backend has exited, after close() returns (a writer starting right
    after could find it still held)."""
    conn.execute("SELECT pg_advisory_unlock(%(k)s)", {"k": WRITER_LOCK})


def writer_lock_holder(conn: psycopg.Connection) -> dict[str, Any] | None:
    """pid, application_name, client address and since when of the lock's holder."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT a.pid, a.application_name, a.client_addr::text AS client_addr,
                      a.backend_start, a.usename
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                 AND l.classid::bigint = %(hi)s AND l.objid::bigint = %(lo)s
                 AND l.database = (SELECT oid FROM pg_database
                                   WHERE datname = current_database())""",
            {"hi": WRITER_LOCK >> 32, "lo": WRITER_LOCK & 0xFFFFFFFF},
        )
        return cur.fetchone()


def upsert_catalogue_root(conn: psycopg.Connection, path: str) -> int:
    row = conn.execute(
        """INSERT INTO catalogue_roots (path) VALUES (%(p)s)
           ON CONFLICT (path) DO UPDATE SET path = excluded.path RETURNING id""",
        {"p": path},
    ).fetchone()
    assert row is not None
    return int(row[0])


def catalogue_root_id(conn: psycopg.Connection, path: str) -> int | None:
    row = conn.execute("SELECT id FROM catalogue_roots WHERE path = %(p)s", {"p": path}).fetchone()
    return int(row[0]) if row else None


def catalogue_root_paths(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT path FROM catalogue_roots ORDER BY id")]


def forget_empty_catalogue_root(conn: psycopg.Connection, path: str) -> bool:
    """Delete a catalogue root that no image comes from any more."""
    cur = conn.execute(
        """DELETE FROM catalogue_roots r WHERE r.path = %(p)s
             AND NOT EXISTS (SELECT 1 FROM implant_images im WHERE im.root_id = r.id)""",
        {"p": path},
    )
    return cur.rowcount > 0


def mark_root_ingested(conn: psycopg.Connection, root_id: int) -> None:
    conn.execute(
        "UPDATE catalogue_roots SET last_ingested_at = now() WHERE id = %(r)s", {"r": root_id}
    )


def root_images(conn: psycopg.Connection, root_id: int, model_id: str) -> list[dict[str, Any]]:
    """Every image recorded from one catalogue root, with its implant key and whether
    it already has an embedding from `model_id`."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT im.id, im.implant_id, i.key, im.source_path, im.sha256, im.file_size,
                      im.file_mtime_ns,
                      EXISTS (SELECT 1 FROM image_embeddings e
                              WHERE e.image_id = im.id AND e.model_id = %(m)s) AS embedded
               FROM implant_images im JOIN implants i ON i.id = im.implant_id
               WHERE im.root_id = %(r)s""",
            {"r": root_id, "m": model_id},
        )
        return list(cur.fetchall())


def images_of_implants(
    conn: psycopg.Connection, keys: Sequence[str], model_id: str
) -> list[dict[str, Any]]:
    """All images (any root) of the implants with these keys: what content each
    implant already has, so a renamed or touched file is not embedded again."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT im.id, i.key, im.sha256, im.root_id, im.source_path, r.path AS root_path,
                      EXISTS (SELECT 1 FROM image_embeddings e
                              WHERE e.image_id = im.id AND e.model_id = %(m)s) AS embedded
               FROM implant_images im JOIN implants i ON i.id = im.implant_id
               LEFT JOIN catalogue_roots r ON r.id = im.root_id
               WHERE i.key = ANY(%(k)s)""",
            {"k": list(keys), "m": model_id},
        )
        return list(cur.fetchall())


def implants_by_key(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored metadata of these implants, to write only the ones that changed."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, key, name, manufacturer, system, diameter_mm, length_mm,
                      connection, notes, extra
               FROM implants WHERE key = ANY(%(k)s)""",
            {"k": list(keys)},
        )
        return {row["key"]: row for row in cur.fetchall()}


def move_image(
    conn: psycopg.Connection,
    image_id: int,
    *,
    root_id: int,
    source_path: str,
    file_size: int,
    file_mtime_ns: int,
) -> None:
    """Record where known content now lives (a touched, renamed or moved file)."""
    conn.execute(
        """UPDATE implant_images SET root_id = %(r)s, source_path = %(p)s,
                  file_size = %(size)s, file_mtime_ns = %(mtime)s, updated_at = now()
           WHERE id = %(id)s""",
        {"id": image_id, "r": root_id, "p": source_path, "size": file_size, "mtime": file_mtime_ns},
    )


def delete_other_images_at(
    conn: psycopg.Connection, root_id: int, source_path: str, keep_id: int
) -> list[int]:
    """Remove what a path held before it got new content (or another implant);
    returns the implant ids those rows belonged to."""
    rows = conn.execute(
        """DELETE FROM implant_images
           WHERE root_id = %(r)s AND source_path = %(p)s AND id <> %(keep)s
           RETURNING implant_id""",
        {"r": root_id, "p": source_path, "keep": keep_id},
    )
    return [row[0] for row in rows]


def delete_images(conn: psycopg.Connection, image_ids: Sequence[int]) -> list[int]:
    """Delete images (their embeddings go with them); returns their implant ids."""
    rows = conn.execute(
        "DELETE FROM implant_images WHERE id = ANY(%(ids)s) RETURNING implant_id",
        {"ids": list(image_ids)},
    )
    return [row[0] for row in rows]


def delete_imageless_implants(conn: psycopg.Connection, implant_ids: Sequence[int]) -> int:
    """Of these implants, delete those left without any image."""
    cur = conn.execute(
        """DELETE FROM implants i WHERE i.id = ANY(%(ids)s)
             AND NOT EXISTS (SELECT 1 FROM implant_images im WHERE im.implant_id = i.id)""",
        {"ids": list(set(implant_ids))},
    )
    return cur.rowcount


def images_missing_embedding(
    conn: psycopg.Connection, model_id: str, *, after_id: int = 0, limit: int = 1000
) -> list[dict[str, Any]]:
    """Images with no embedding from `model_id`, where their bytes can be found
    (source file or stored object), in id order from `after_id` (keyset paging)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT im.id, im.sha256, im.storage_key, im.source_path, r.path AS root_path
               FROM implant_images im LEFT JOIN catalogue_roots r ON r.id = im.root_id
               WHERE im.id > %(after)s
                 AND NOT EXISTS (SELECT 1 FROM image_embeddings e
                                 WHERE e.image_id = im.id AND e.model_id = %(m)s)
               ORDER BY im.id LIMIT %(limit)s""",
            {"m": model_id, "after": after_id, "limit": limit},
        )
        return list(cur.fetchall())


def sample_images(conn: psycopg.Connection, *, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` catalogue images spread over as many implants as possible (the
    first image of each implant, then the second...), with where their bytes are
    and their implant's key: the int8 parity gate's images."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, sha256, storage_key, source_path, root_path, implant_key FROM (
                 SELECT im.id, im.sha256, im.storage_key, im.source_path, r.path AS root_path,
                        i.key AS implant_key,
                        row_number() OVER (PARTITION BY im.implant_id ORDER BY im.id) AS nth
                 FROM implant_images im
                 JOIN implants i ON i.id = im.implant_id
                 LEFT JOIN catalogue_roots r ON r.id = im.root_id) ranked
               ORDER BY nth, id LIMIT %(limit)s""",
            {"limit": limit},
        )
        return list(cur.fetchall())


def count_images(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM implant_images").fetchone()
    return int(row[0]) if row else 0


def count_images_missing_embedding(conn: psycopg.Connection, model_id: str) -> int:
    row = conn.execute(
        """SELECT count(*) FROM implant_images im
           WHERE NOT EXISTS (SELECT 1 FROM image_embeddings e
                             WHERE e.image_id = im.id AND e.model_id = %(m)s)""",
        {"m": model_id},
    ).fetchone()
    return int(row[0]) if row else 0


def lock_settings(conn: psycopg.Connection) -> None:
    """Within a transaction: hold the settings table still while the active model
    flips, so the flip and its completeness check are one atomic step."""
    conn.execute("LOCK TABLE settings IN SHARE ROW EXCLUSIVE MODE")


def other_models(conn: psycopg.Connection, model_id: str) -> list[ModelRow]:
    rows = conn.execute(
        """SELECT model_id, dim, preprocess_ver, index_name FROM models
           WHERE model_id <> %(m)s ORDER BY created_at""",
        {"m": model_id},
    )
    return [ModelRow(*row) for row in rows]


def delete_model(conn: psycopg.Connection, model: ModelRow) -> int:
    """Drop a model's HNSW index, its embeddings and its row; returns rows deleted."""
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(model.index_name)))
    cur = conn.execute("DELETE FROM image_embeddings WHERE model_id = %(m)s", {"m": model.model_id})
    deleted = cur.rowcount
    conn.execute("DELETE FROM models WHERE model_id = %(m)s", {"m": model.model_id})
    return deleted


def reindex_model_index(conn: psycopg.Connection, model: ModelRow) -> None:
    """Rebuild an index that a crash during CREATE INDEX left invalid."""
    conn.execute(sql.SQL("REINDEX INDEX {}").format(sql.Identifier(model.index_name)))


def find_implants_by_name(
    conn: psycopg.Connection, text: str, *, limit: int
) -> list[dict[str, Any]]:
    """Implants whose name, system or manufacturer contains `text` (any case),
    names that start with it first: the result page's "search the catalogue"."""
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, key, name, manufacturer, system FROM implants
               WHERE name ILIKE %(p)s OR system ILIKE %(p)s OR manufacturer ILIKE %(p)s
               ORDER BY (name ILIKE %(start)s) DESC, name, id LIMIT %(limit)s""",
            {"p": pattern, "start": pattern[1:], "limit": limit},
        )
        return list(cur.fetchall())
