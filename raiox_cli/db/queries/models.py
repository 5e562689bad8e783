"""Settings and embedding models (one row per model, its partial HNSW index)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

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
    conn: psycopg.Connection,
    model_id: str,
    dim: int,
    preprocess_ver: int,
    *,
    weights: tuple[str, str] | None = None,
) -> ModelRow:
    """Record a model and create its HNSW index (a partial index over its rows);
    `weights`, (path, sha256) of the local file it was loaded from, is kept current."""
    index_name = index_name_for(model_id)
    path, sha256 = weights or (None, None)
    conn.execute(
        """INSERT INTO models (model_id, dim, preprocess_ver, index_name, weights_path,
                               weights_sha256)
           VALUES (%(m)s, %(dim)s, %(pv)s, %(ix)s, %(path)s, %(sha)s)
           ON CONFLICT (model_id) DO UPDATE
           SET weights_path = coalesce(excluded.weights_path, models.weights_path),
               weights_sha256 = coalesce(excluded.weights_sha256, models.weights_sha256)""",
        {
            "m": model_id,
            "dim": dim,
            "pv": preprocess_ver,
            "ix": index_name,
            "path": path,
            "sha": sha256,
        },
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


@dataclass(frozen=True)
class ModelWeights:
    model_id: str
    path: str
    sha256: str


def active_model_weights(conn: psycopg.Connection) -> ModelWeights | None:
    """The weights file the active model was loaded from, when it was a local file."""
    row = conn.execute(
        """SELECT m.model_id, m.weights_path, m.weights_sha256
           FROM settings s JOIN models m ON m.model_id = s.value
           WHERE s.key = 'active_model' AND m.weights_path IS NOT NULL"""
    ).fetchone()
    return ModelWeights(*row) if row else None


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
