"""Search: nearest images -> distinct implants through the model's HNSW index."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from raiox_cli.db.queries.models import ModelRow

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


def _nearest_many_sql(model: ModelRow, manufacturer: bool) -> sql.Composed:
    """`_nearest_sql` for many queries in one statement: a LATERAL join over the
    unnest of the query vectors, each lateral an index scan of its own (the same
    ORDER BY ... LIMIT on the model's HNSW index expression, the query vector a
    parameter from the outer row), then the best image per implant, top k."""
    distance = sql.SQL("(e.embedding::vector({dim})) <=> q.v").format(dim=sql.Literal(model.dim))
    return sql.SQL(
        """WITH q AS MATERIALIZED (
               SELECT t.ord, t.v FROM unnest(%(qs)s::vector({dim})[]) WITH ORDINALITY AS t(v, ord))
           SELECT q.ord, {columns}, top.fetched
           FROM q CROSS JOIN LATERAL (
               SELECT best.implant_id, best.image_id, best.distance, best.fetched
               FROM (SELECT DISTINCT ON (c.implant_id) c.implant_id, c.image_id, c.distance,
                            c.fetched
                     FROM (SELECT nn.image_id, nn.distance, count(*) OVER () AS fetched,
                                  {implant_of} AS implant_id
                           FROM (SELECT e.image_id, {distance} AS distance
                                 FROM image_embeddings e
                                 WHERE e.model_id = {model}{filter}
                                 ORDER BY {distance}
                                 LIMIT %(candidates)s) nn) c
                     ORDER BY c.implant_id, c.distance) best
               ORDER BY best.distance, best.implant_id
               LIMIT %(k)s) top
           JOIN implants i ON i.id = top.implant_id
           JOIN implant_images im ON im.id = top.image_id
           LEFT JOIN catalogue_roots r ON r.id = im.root_id
           ORDER BY q.ord, top.distance, i.id"""
    ).format(
        dim=sql.Literal(model.dim),
        distance=distance,
        model=sql.Literal(model.model_id),
        filter=_manufacturer_filter(manufacturer),
        implant_of=sql.SQL(_IMPLANT_OF.format(image="nn.image_id")),
        columns=_IMPLANT_COLUMNS,
    )


def _many_params(
    queries: np.ndarray, k: int, candidates: int, manufacturer: str | None
) -> dict[str, Any]:
    return {
        "qs": [np.asarray(q, dtype=np.float32) for q in queries],
        "k": k,
        "candidates": candidates,
        "manufacturer": manufacturer,
    }


def nearest_implants_many(
    conn: psycopg.Connection,
    model: ModelRow,
    queries: np.ndarray,
    *,
    k: int,
    candidates: int,
    manufacturer: str | None = None,
) -> list[tuple[list[dict[str, Any]], int]]:
    """`nearest_implants` for each of many query vectors, in one round trip."""
    found: list[list[dict[str, Any]]] = [[] for _ in range(len(queries))]
    fetched = [0] * len(queries)
    if not len(queries):
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _nearest_many_sql(model, manufacturer is not None),
            _many_params(queries, k, candidates, manufacturer),
        )
        for row in cur.fetchall():
            index = int(row.pop("ord")) - 1
            fetched[index] = int(row.pop("fetched"))
            found[index].append(row)
    return list(zip(found, fetched, strict=True))


def explain_nearest_many(
    conn: psycopg.Connection,
    model: ModelRow,
    queries: np.ndarray,
    *,
    k: int,
    candidates: int,
    manufacturer: str | None = None,
) -> str:
    plan = sql.SQL("EXPLAIN ") + _nearest_many_sql(model, manufacturer is not None)
    params = _many_params(queries, k, candidates, manufacturer)
    return "\n".join(r[0] for r in conn.execute(plan, params))


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
