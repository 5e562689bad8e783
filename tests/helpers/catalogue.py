"""Catalogues for tests: the rows ingest writes, built from a synthetic catalogue with
the tiny model; copying a folder to S3; comparing what two runs left in their databases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np

from raiox_cli import config, db, images
from raiox_cli.db import queries
from raiox_cli.store import objects as storage


@dataclass
class Catalogue:
    """What the `catalogue` fixture made: a migrated database holding a small
    synthetic catalogue, its images in moto's S3, and one query X-ray."""

    settings: config.Settings
    store: storage.Store
    query_png: bytes
    implant_ids: list[int]


def store_synthetic_catalogue(conn, embedder, info, store=None) -> list[int]:
    """Write a synth.make_catalogue() result through the data layer, embedded by the
    real (tiny) model: the rows ingest writes. Returns the implant ids in order;
    with a store, each image's bytes go there and rows carry its key."""

    model = queries.register_model(conn, embedder.model_id, embedder.dim, 1)
    implant_ids, pairs = [], []
    for implant in info.implants:
        d = implant.design
        implant_id = queries.upsert_implant(
            conn,
            {
                "key": implant.key,
                "name": d.name,
                "manufacturer": d.manufacturer,
                "system": d.system,
                "diameter_mm": d.diameter_mm,
                "length_mm": d.length_mm,
                "connection": d.connection,
            },
        )
        implant_ids.append(implant_id)
        for path in implant.views:
            data = path.read_bytes()
            loaded = images.load_image(data)
            row = {"implant_id": implant_id, "sha256": loaded.sha256, "source_path": str(path)}
            if store is not None:
                row["storage_key"] = store.put(loaded.sha256, data, content_type="image/png")
            vector = embedder.embed_images([loaded.image])[0]
            pairs.append((queries.upsert_image(conn, row), vector))
    queries.copy_embeddings(conn, model.model_id, pairs)
    queries.activate_model(conn, model.model_id)
    queries.analyze_embeddings(conn)
    conn.commit()
    return implant_ids


def upload_folder(folder: Path, endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Copy a folder's files to s3://bucket/prefix/...; returns the keys."""

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
    return keys


def catalogue_rows(settings: config.Settings) -> dict:
    """What an ingest leaves behind, independent of ids, timestamps and where the
    catalogue root is: implants, images (key, sha256, source path, storage key, size)
    and each image's vectors by (implant key, sha256, model)."""

    with db.connect(settings) as conn:
        images = conn.execute(
            """SELECT i.key, i.name, i.manufacturer, i.system, i.diameter_mm, im.sha256,
                      im.source_path, im.storage_key, im.width, im.height
               FROM implant_images im JOIN implants i ON i.id = im.implant_id"""
        ).fetchall()
        vectors = conn.execute(
            """SELECT i.key, im.sha256, e.model_id, e.embedding
               FROM image_embeddings e JOIN implant_images im ON im.id = e.image_id
               JOIN implants i ON i.id = im.implant_id"""
        ).fetchall()
        implants = conn.execute("SELECT key, extra FROM implants").fetchall()
        active = queries.active_model(conn)
    return {
        "images": sorted(images),
        "implants": sorted(implants, key=lambda r: r[0]),
        "vectors": {(k, s, m): v.to_numpy() for k, s, m, v in vectors},
        "active": active.model_id if active else None,
    }


def assert_same_rows(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got["images"] == want["images"]
    assert got["implants"] == want["implants"]
    assert got["active"] == want["active"]
    assert got["vectors"].keys() == want["vectors"].keys()
    for key, vector in want["vectors"].items():
        np.testing.assert_allclose(got["vectors"][key], vector, atol=atol)
