"""Training data for `raiox adapt`: the catalogue's labelled images."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["training_images"]


def training_images(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every catalogue image with its implant's key and where its bytes are
    (source file, stored object), in a stable order (implant key, sha256)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT im.id, i.key, im.sha256, im.storage_key, im.source_path,
                      r.path AS root_path
               FROM implant_images im JOIN implants i ON i.id = im.implant_id
               LEFT JOIN catalogue_roots r ON r.id = im.root_id
               ORDER BY i.key, im.sha256"""
        )
        return list(cur.fetchall())
