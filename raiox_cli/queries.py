"""The data layer: every SQL statement raiox runs, one intent-named function each.

Values are always bound parameters. The only composed SQL is what PostgreSQL
cannot take as a parameter (a vector's dimension, an index name, the literal a
partial index is matched on); those come from `models` rows, never from input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

MIGRATIONS_LOCK = 7_236_001  # advisory lock keys: arbitrary, fixed, distinct
WRITER_LOCK = 7_236_002

# --- schema and migrations ---------------------------------------------------


def vector_extension_available(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    return row is not None


def create_vector_extension(conn: psycopg.Connection) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def lock_migrations(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATIONS_LOCK,))


def unlock_migrations(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATIONS_LOCK,))


def create_migrations_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer PRIMARY KEY,
               name       text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


def applied_migrations(conn: psycopg.Connection) -> set[int]:
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def record_migration(conn: psycopg.Connection, version: int, name: str) -> None:
    conn.execute(
        "INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)",
        {"version": version, "name": name},
    )


def schema_version(conn: psycopg.Connection) -> int | None:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] if row else None


# --- settings and models -----------------------------------------------------


def set_setting(conn: psycopg.Connection, key: str, value: str) -> None:
    conn.execute(
        """INSERT INTO settings (key, value) VALUES (%(key)s, %(value)s)
           ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()""",
        {"key": key, "value": value},
    )


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    dim: int
    preprocess_ver: int
    index_name: str


def index_name_for(model_id: str) -> str:
    return "image_embeddings_hnsw_" + hashlib.sha256(model_id.encode()).hexdigest()[:12]


def get_model(conn: psycopg.Connection, model_id: str) -> ModelRow | None:
    row = conn.execute(
        "SELECT model_id, dim, preprocess_ver, index_name FROM models WHERE model_id = %(m)s",
        {"m": model_id},
    ).fetchone()
    return ModelRow(*row) if row else None


def active_model(conn: psycopg.Connection) -> ModelRow | None:
    """The model whose embeddings search answers from (None before the first ingest)."""
    row = conn.execute(
        """SELECT m.model_id, m.dim, m.preprocess_ver, m.index_name
           FROM settings s JOIN models m ON m.model_id = s.value
           WHERE s.key = 'active_model'"""
    ).fetchone()
    return ModelRow(*row) if row else None


def register_model(
    conn: psycopg.Connection, model_id: str, dim: int, preprocess_ver: int
) -> ModelRow:
    """Record a model and create its HNSW index (a partial index over its rows)."""
    index_name = index_name_for(model_id)
    conn.execute(
        """INSERT INTO models (model_id, dim, preprocess_ver, index_name)
           VALUES (%(m)s, %(dim)s, %(pv)s, %(ix)s) ON CONFLICT (model_id) DO NOTHING""",
        {"m": model_id, "dim": dim, "pv": preprocess_ver, "ix": index_name},
    )
    model = get_model(conn, model_id)
    assert model is not None
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {ix} ON image_embeddings "
            "USING hnsw ((embedding::vector({dim})) vector_cosine_ops) "
            "WHERE model_id = {model}"
        ).format(
            ix=sql.Identifier(model.index_name),
            dim=sql.Literal(model.dim),
            model=sql.Literal(model.model_id),
        )
    )
    return model


def activate_model(conn: psycopg.Connection, model_id: str) -> None:
    set_setting(conn, "active_model", model_id)


def model_index_valid(conn: psycopg.Connection, model: ModelRow) -> bool:
    row = conn.execute(
        """SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE c.relname = %(ix)s""",
        {"ix": model.index_name},
    ).fetchone()
    return bool(row and row[0])


def analyze_embeddings(conn: psycopg.Connection) -> None:
    conn.execute("ANALYZE implants, implant_images, image_embeddings")


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


# --- search ------------------------------------------------------------------
# The nearest-image scan must read `(embedding::vector(D)) <=> q` with
# `WHERE model_id = <literal>`: exactly the model's partial HNSW index expression,
# or PostgreSQL cannot use the index. D and the literal come from `models` rows.


def iterative_scan_supported(conn: psycopg.Connection) -> bool:
    """pgvector >= 0.8: an HNSW scan can go on past ef_search until LIMIT is met.
    (The cast loads pgvector's library, which defines its settings.)"""
    row = conn.execute(
        "SELECT current_setting('hnsw.iterative_scan', true) FROM (SELECT '[1]'::vector) v"
    ).fetchone()
    return bool(row and row[0] is not None)


def configure_search(
    conn: psycopg.Connection,
    *,
    ef_search: int,
    iterative: bool,
    max_scan_tuples: int,
    local: bool,
) -> None:
    """Settings for nearest-neighbour scans; `local`: for the current transaction
    only, so pooled connections do not carry them into unrelated work. Sequential
    scans are disabled: on a small or freshly ANALYZEd catalogue, or for a large
    LIMIT, the planner otherwise prefers a seq scan + sort, which grows linearly
    with the catalogue. The search statements below only look rows up by key."""
    conn.execute(
        "SELECT set_config('hnsw.ef_search', %(ef)s, %(local)s), "
        "set_config('enable_seqscan', 'off', %(local)s)",
        {"ef": str(ef_search), "local": local},
    )
    if iterative:
        conn.execute(
            "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', %(local)s), "
            "set_config('hnsw.max_scan_tuples', %(mst)s, %(local)s)",
            {"mst": str(max_scan_tuples), "local": local},
        )


# The implant of an image, looked up per candidate row (a scalar subquery is never
# turned into a join, so it stays one primary-key probe per row the scan yields).
_IMPLANT_OF = "(SELECT im.implant_id FROM implant_images im WHERE im.id = {image})"


def _manufacturer_filter(manufacturer: bool) -> sql.SQL:
    # A condition checked on each row the HNSW scan yields (iterative scans keep
    # it fed), against a hashed set of the manufacturer's implants. IS TRUE keeps
    # the planner from making it a join that would take the ordering from the index.
    if not manufacturer:
        return sql.SQL("")
    return sql.SQL(
        " AND (" + _IMPLANT_OF.format(image="e.image_id") + " IN (SELECT i2.id FROM implants i2 "
        "WHERE lower(i2.manufacturer) = lower(%(manufacturer)s))) IS TRUE"
    )


_IMPLANT_COLUMNS = sql.SQL(
    """i.id, i.key, i.name, i.manufacturer, i.system, i.diameter_mm, i.length_mm,
       i.connection, top.image_id, im.storage_key, im.source_path, r.path AS root_path,
       1 - top.distance AS score"""
)

# The k best implants of `best` (implant_id, image_id, distance), with their details.
_TOP_IMPLANTS = """top AS MATERIALIZED (
               SELECT implant_id, image_id, distance FROM best
               ORDER BY distance, implant_id LIMIT %(k)s)
           SELECT {columns}{extra}
           FROM top JOIN implants i ON i.id = top.implant_id
                    JOIN implant_images im ON im.id = top.image_id
                    LEFT JOIN catalogue_roots r ON r.id = im.root_id
           ORDER BY top.distance, i.id"""


def _nearest_sql(model: ModelRow, manufacturer: bool) -> sql.Composed:
    """The `candidates` nearest images through the model's HNSW index, then the best
    image per implant, best implants first. `fetched` tells the caller whether the
    index had more to give (fetched == candidates)."""
    distance = sql.SQL("(e.embedding::vector({dim})) <=> %(q)s").format(dim=sql.Literal(model.dim))
    return sql.SQL(
        """WITH nn AS MATERIALIZED (
               SELECT e.image_id, {distance} AS distance
               FROM image_embeddings e
               WHERE e.model_id = {model}{filter}
               ORDER BY {distance}
               LIMIT %(candidates)s),
           best AS MATERIALIZED (
               SELECT DISTINCT ON (implant_id) implant_id, image_id, distance
               FROM (SELECT nn.image_id, nn.distance, {implant_of} AS implant_id FROM nn) c
               ORDER BY implant_id, distance),
           """
        + _TOP_IMPLANTS
    ).format(
        distance=distance,
        model=sql.Literal(model.model_id),
        filter=_manufacturer_filter(manufacturer),
        implant_of=sql.SQL(_IMPLANT_OF.format(image="nn.image_id")),
        columns=_IMPLANT_COLUMNS,
        extra=sql.SQL(", (SELECT count(*) FROM nn) AS fetched"),
    )


def nearest_implants(
    conn: psycopg.Connection,
    model: ModelRow,
    query: np.ndarray,
    *,
    k: int,
    candidates: int,
    manufacturer: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Up to k implants whose best image is among the `candidates` nearest images,
    best first, and how many images the index returned."""
    params = {
        "q": np.asarray(query, dtype=np.float32),
        "k": k,
        "candidates": candidates,
        "manufacturer": manufacturer,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_nearest_sql(model, manufacturer is not None), params)
        rows = list(cur.fetchall())
    fetched = int(rows[0].pop("fetched")) if rows else 0
    for row in rows[1:]:
        row.pop("fetched")
    return rows, fetched


def exact_nearest_implants(
    conn: psycopg.Connection,
    model: ModelRow,
    query: np.ndarray,
    *,
    k: int,
    manufacturer: str | None = None,
) -> list[dict[str, Any]]:
    """The exact answer: every image of the model compared (no HNSW). The fallback
    when an index scan ran out before k implants, and the benchmarks' ground truth."""
    filter_ = sql.SQL(
        " AND im.implant_id IN (SELECT i2.id FROM implants i2 "
        "WHERE lower(i2.manufacturer) = lower(%(manufacturer)s))"
        if manufacturer is not None
        else ""
    )
    statement = sql.SQL(
        """WITH best AS MATERIALIZED (
               SELECT DISTINCT ON (im.implant_id) im.implant_id, e.image_id,
                      e.embedding <=> %(q)s AS distance
               FROM image_embeddings e JOIN implant_images im ON im.id = e.image_id
               WHERE e.model_id = %(m)s{filter}
               ORDER BY im.implant_id, distance),
           """
        + _TOP_IMPLANTS
    ).format(filter=filter_, columns=_IMPLANT_COLUMNS, extra=sql.SQL(""))
    params = {
        "q": np.asarray(query, dtype=np.float32),
        "m": model.model_id,
        "k": k,
        "manufacturer": manufacturer,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(statement, params)
        return list(cur.fetchall())


def allow_seqscan(conn: psycopg.Connection, allowed: bool, *, local: bool = False) -> None:
    """The exact scan reads every row: there a sequential scan is the right plan."""
    conn.execute(
        "SELECT set_config('enable_seqscan', %(v)s, %(local)s)",
        {"v": "on" if allowed else "off", "local": local},
    )


def count_searchable_implants(
    conn: psycopg.Connection, model: ModelRow, manufacturer: str | None = None
) -> int:
    """Implants with at least one embedding of this model (of this manufacturer)."""
    row = conn.execute(
        """SELECT count(DISTINCT im.implant_id)
           FROM image_embeddings e JOIN implant_images im ON im.id = e.image_id
                                   JOIN implants i ON i.id = im.implant_id
           WHERE e.model_id = %(m)s
             AND (%(manufacturer)s::text IS NULL
                  OR lower(i.manufacturer) = lower(%(manufacturer)s::text))""",
        {"m": model.model_id, "manufacturer": manufacturer},
    ).fetchone()
    return int(row[0]) if row else 0


def explain_nearest(
    conn: psycopg.Connection,
    model: ModelRow,
    query: np.ndarray,
    *,
    k: int,
    candidates: int,
    manufacturer: str | None = None,
) -> str:
    plan = sql.SQL("EXPLAIN ") + _nearest_sql(model, manufacturer is not None)
    params = {
        "q": np.asarray(query, dtype=np.float32),
        "k": k,
        "candidates": candidates,
        "manufacturer": manufacturer,
    }
    return "\n".join(r[0] for r in conn.execute(plan, params))


# Bulk loading for bench/bench_search.py: 100,000 rows in seconds, index built after.


def copy_images(conn: psycopg.Connection, rows: Iterable[tuple[int, str]]) -> None:
    """Binary COPY of (implant_id, sha256) image rows."""
    with conn.cursor().copy(
        "COPY implant_images (implant_id, sha256) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "text"])
        for row in rows:
            copy.write_row(row)


def image_ids(conn: psycopg.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM implant_images ORDER BY id")]


def drop_model_index(conn: psycopg.Connection, model: ModelRow) -> None:
    """Before a bulk load: one HNSW build afterwards beats 100,000 graph inserts."""
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(model.index_name)))


def set_build_memory(conn: psycopg.Connection, size: str) -> None:
    """maintenance_work_mem for an index build: HNSW builds fast only in memory."""
    conn.execute("SELECT set_config('maintenance_work_mem', %(v)s, false)", {"v": size})


def model_has_embeddings(conn: psycopg.Connection, model_id: str) -> bool:
    """Cheaper than counting: search asks this before every query."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM image_embeddings WHERE model_id = %(m)s)", {"m": model_id}
    ).fetchone()
    return bool(row and row[0])


def implant_keys(conn: psycopg.Connection) -> list[str]:
    """Every implant key, for matching evaluation labels."""
    return [row[0] for row in conn.execute("SELECT key FROM implants ORDER BY key")]


def set_max_scan_tuples(conn: psycopg.Connection, bound: int, *, local: bool = False) -> None:
    conn.execute(
        "SELECT set_config('hnsw.max_scan_tuples', %(v)s, %(local)s)",
        {"v": str(bound), "local": local},
    )


def set_ef_search(conn: psycopg.Connection, ef_search: int, *, local: bool = False) -> None:
    conn.execute(
        "SELECT set_config('hnsw.ef_search', %(v)s, %(local)s)",
        {"v": str(ef_search), "local": local},
    )


def count_implants(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM implants").fetchone()
    return int(row[0]) if row else 0


# --- analyses (submitted X-rays; also the server's job queue) ------------------


def create_analysis(
    conn: psycopg.Connection,
    *,
    source: str,
    client_id: str | None = None,
    idempotency_key: str | None = None,
    image_url: str | None = None,
    image_sha256: str | None = None,
    storage_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    status: str = "pending",
) -> tuple[int, bool]:
    """Record a submitted X-ray; returns (id, created). A repeated idempotency key
    returns the existing analysis with created=False."""
    params = {
        "source": source,
        "client_id": client_id,
        "key": idempotency_key,
        "image_url": image_url,
        "sha": image_sha256,
        "storage_key": storage_key,
        "metadata": psycopg.types.json.Jsonb(metadata or {}),
        "status": status,
    }
    row = conn.execute(
        """INSERT INTO analyses (source, client_id, idempotency_key, image_url, image_sha256,
                                 storage_key, metadata, status)
           VALUES (%(source)s, %(client_id)s, %(key)s, %(image_url)s, %(sha)s,
                   %(storage_key)s, %(metadata)s, %(status)s)
           ON CONFLICT (idempotency_key) DO NOTHING
           RETURNING id""",
        params,
    ).fetchone()
    if row is not None:
        return int(row[0]), True
    existing = conn.execute(
        "SELECT id FROM analyses WHERE idempotency_key = %(key)s", params
    ).fetchone()
    assert existing is not None
    return int(existing[0]), False


def finish_analysis(
    conn: psycopg.Connection,
    analysis_id: int,
    *,
    model_id: str,
    matches: Sequence[Any],
) -> None:
    """Store the ranked matches (objects with rank, implant_id, image_id, key, score)
    and mark the analysis done, replacing matches of an earlier attempt."""
    conn.execute("DELETE FROM analysis_matches WHERE analysis_id = %(a)s", {"a": analysis_id})
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO analysis_matches (analysis_id, rank, implant_id, image_id,
                                             implant_key, score)
               VALUES (%(a)s, %(rank)s, %(implant)s, %(image)s, %(key)s, %(score)s)""",
            [
                {
                    "a": analysis_id,
                    "rank": m.rank,
                    "implant": m.implant_id,
                    "image": m.image_id,
                    "key": m.key,
                    "score": m.score,
                }
                for m in matches
            ],
        )
    conn.execute(
        # clock_timestamp(): now() is the transaction's start, before the embedding ran.
        """UPDATE analyses SET status = 'done', model_id = %(m)s, error = NULL,
                  updated_at = clock_timestamp(), finished_at = clock_timestamp(),
                  locked_until = NULL
           WHERE id = %(a)s""",
        {"a": analysis_id, "m": model_id},
    )


def get_analysis(conn: psycopg.Connection, analysis_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM analyses WHERE id = %(a)s", {"a": analysis_id})
        return cur.fetchone()


def analysis_matches(conn: psycopg.Connection, analysis_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT m.rank, m.implant_id, m.image_id, m.implant_key, m.score,
                      i.name, i.manufacturer, i.system, im.storage_key
               FROM analysis_matches m
               LEFT JOIN implants i ON i.id = m.implant_id
               LEFT JOIN implant_images im ON im.id = m.image_id
               WHERE m.analysis_id = %(a)s ORDER BY m.rank""",
            {"a": analysis_id},
        )
        return list(cur.fetchall())


# --- server job queue and catalogue browsing (serve-webhook-minimal) -----------
# A job is an analyses row. Claiming sets status 'running', bumps `attempts` and
# leases the row until `locked_until`; a worker that dies leaves the lease to
# expire and another claims the row again. Every later write names the attempt it
# claimed, so a worker whose lease was taken over cannot overwrite the new owner.
# After a job ends, `next_attempt_at` and `locked_until` drive its notification.


def claim_next_job(conn: psycopg.Connection, *, lease_s: float) -> dict[str, Any] | None:
    """Take the oldest due job (pending, or running with an expired lease)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """UPDATE analyses SET status = 'running', attempts = attempts + 1,
                      locked_until = now() + make_interval(secs => %(lease)s),
                      updated_at = now()
               WHERE id = (SELECT id FROM analyses
                           WHERE status IN ('pending', 'running')
                             AND next_attempt_at <= now()
                             AND (status = 'pending' OR locked_until < now())
                           ORDER BY next_attempt_at, id
                           LIMIT 1 FOR UPDATE SKIP LOCKED)
               RETURNING id, source, client_id, image_url, image_sha256, storage_key,
                         metadata, attempts""",
            {"lease": lease_s},
        )
        return cur.fetchone()


def lock_claimed_job(conn: psycopg.Connection, analysis_id: int, attempt: int) -> bool:
    """Lock the row for the final write; False when the lease went to another worker."""
    row = conn.execute(
        """SELECT 1 FROM analyses WHERE id = %(a)s AND status = 'running'
                                   AND attempts = %(n)s FOR UPDATE""",
        {"a": analysis_id, "n": attempt},
    ).fetchone()
    return row is not None


def record_analysis_image(
    conn: psycopg.Connection, analysis_id: int, *, sha256: str, storage_key: str
) -> None:
    conn.execute(
        """UPDATE analyses SET image_sha256 = %(sha)s, storage_key = %(key)s, updated_at = now()
           WHERE id = %(a)s""",
        {"a": analysis_id, "sha": sha256, "key": storage_key},
    )


def retry_job(
    conn: psycopg.Connection, analysis_id: int, attempt: int, *, error: str, delay_s: float
) -> bool:
    row = conn.execute(
        """UPDATE analyses SET status = 'pending', error = %(error)s, locked_until = NULL,
                  next_attempt_at = now() + make_interval(secs => %(delay)s), updated_at = now()
           WHERE id = %(a)s AND status = 'running' AND attempts = %(n)s RETURNING id""",
        {"a": analysis_id, "n": attempt, "error": error, "delay": delay_s},
    ).fetchone()
    return row is not None


def fail_job(conn: psycopg.Connection, analysis_id: int, attempt: int, *, error: str) -> bool:
    row = conn.execute(
        """UPDATE analyses SET status = 'failed', error = %(error)s, locked_until = NULL,
                  updated_at = clock_timestamp(), finished_at = clock_timestamp()
           WHERE id = %(a)s AND status = 'running' AND attempts = %(n)s RETURNING id""",
        {"a": analysis_id, "n": attempt, "error": error},
    ).fetchone()
    return row is not None


def release_job(conn: psycopg.Connection, analysis_id: int, attempt: int) -> bool:
    """Give an unfinished job back (graceful shutdown); the attempt does not count."""
    row = conn.execute(
        """UPDATE analyses SET status = 'pending', attempts = attempts - 1,
                  locked_until = NULL, next_attempt_at = now(), updated_at = now()
           WHERE id = %(a)s AND status = 'running' AND attempts = %(n)s RETURNING id""",
        {"a": analysis_id, "n": attempt},
    ).fetchone()
    return row is not None


def count_pending_jobs(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM analyses WHERE status IN ('pending', 'running')"
    ).fetchone()
    return int(row[0]) if row else 0


def ping(conn: psycopg.Connection) -> None:
    conn.execute("SELECT 1")


def request_notification(conn: psycopg.Connection, analysis_id: int) -> None:
    conn.execute(
        """UPDATE analyses SET notify_status = 'pending', next_attempt_at = now(),
                  locked_until = NULL
           WHERE id = %(a)s AND status IN ('done', 'failed')""",
        {"a": analysis_id},
    )


def claim_next_notification(conn: psycopg.Connection, *, lease_s: float) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """UPDATE analyses SET notify_attempts = notify_attempts + 1,
                      locked_until = now() + make_interval(secs => %(lease)s)
               WHERE id = (SELECT id FROM analyses
                           WHERE notify_status = 'pending' AND next_attempt_at <= now()
                             AND (locked_until IS NULL OR locked_until < now())
                           ORDER BY next_attempt_at, id
                           LIMIT 1 FOR UPDATE SKIP LOCKED)
               RETURNING id, notify_attempts""",
            {"lease": lease_s},
        )
        return cur.fetchone()


def notification_sent(conn: psycopg.Connection, analysis_id: int) -> None:
    conn.execute(
        """UPDATE analyses SET notify_status = 'sent', notify_error = NULL, locked_until = NULL
           WHERE id = %(a)s""",
        {"a": analysis_id},
    )


def notification_retry(
    conn: psycopg.Connection, analysis_id: int, *, error: str, delay_s: float
) -> None:
    conn.execute(
        """UPDATE analyses SET notify_error = %(error)s, locked_until = NULL,
                  next_attempt_at = now() + make_interval(secs => %(delay)s)
           WHERE id = %(a)s""",
        {"a": analysis_id, "error": error, "delay": delay_s},
    )


def notification_failed(conn: psycopg.Connection, analysis_id: int, *, error: str) -> None:
    conn.execute(
        """UPDATE analyses SET notify_status = 'failed', notify_error = %(error)s,
                  locked_until = NULL
           WHERE id = %(a)s""",
        {"a": analysis_id, "error": error},
    )


def list_implants(conn: psycopg.Connection, *, skip: int, limit: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT i.id, i.key, i.name, i.manufacturer, i.system, i.diameter_mm,
                      i.length_mm, i.connection,
                      (SELECT count(*) FROM implant_images im WHERE im.implant_id = i.id)
                          AS images
               FROM implants i ORDER BY i.id OFFSET %(skip)s LIMIT %(limit)s""",
            {"skip": skip, "limit": limit},
        )
        return list(cur.fetchall())


def get_implant(conn: psycopg.Connection, implant_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, key, name, manufacturer, system, diameter_mm, length_mm, connection,
                      notes, extra, created_at, updated_at
               FROM implants WHERE id = %(i)s""",
            {"i": implant_id},
        )
        return cur.fetchone()


def implant_images_of(conn: psycopg.Connection, implant_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, sha256, storage_key, format, width, height
               FROM implant_images WHERE implant_id = %(i)s ORDER BY id""",
            {"i": implant_id},
        )
        return list(cur.fetchall())
