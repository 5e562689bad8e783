"""Batch identification: what an earlier `raiox search --save` run already answered."""

from __future__ import annotations

import psycopg


def answered_analyses(
    conn: psycopg.Connection, *, model_id: str, source: str = "cli"
) -> set[tuple[str, str]]:
    """(query path, image sha256) of every finished analysis of this model and source:
    a resumed batch search skips those."""
    rows = conn.execute(
        """SELECT metadata->>'path', image_sha256 FROM analyses
           WHERE source = %(source)s AND status = 'done' AND model_id = %(m)s
             AND image_sha256 IS NOT NULL AND metadata ? 'path'""",
        {"source": source, "m": model_id},
    ).fetchall()
    return {(path, sha) for path, sha in rows}
