"""pipeline.py: the stages give what the one-image path gives; the engine keeps order;
a fresh embedded home gets its schema without init-db."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from raiox_cli import images
from raiox_cli.catalogue import pipeline
from raiox_cli.cli import app
from raiox_cli.training import synth
from tests.helpers.env import TINY_ENV


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    info = synth.make_catalogue(
        tmp_path_factory.mktemp("synth"), systems=3, views=2, queries=0, size=(80, 100)
    )
    return info.catalogue_files


def test_stages_equal_the_one_image_path(tiny_embedder, pictures: list[Path], tmp_path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    rows = [
        pipeline.read({"path": str(p)}, max_bytes=images.DEFAULT_MAX_BYTES)
        for p in [*pictures, bad, tmp_path / "missing.png"]
    ]
    assert rows[-1]["error"] == "no such file"
    rows = [
        pipeline.decode(
            row,
            transform=tiny_embedder.preprocessor,
            max_pixels=images.DEFAULT_MAX_PIXELS,
            max_bytes=images.DEFAULT_MAX_BYTES,
            views=pipeline.ORIENTATIONS,
        )
        for row in rows
    ]
    assert "not a supported image" in rows[-2]["error"] and "pixels" not in rows[-2]
    rows = pipeline.embed(rows, tiny_embedder)
    for path, row in zip(pictures, rows, strict=False):
        loaded = images.load_image(path)
        assert row["sha256"] == loaded.sha256 and row["pixels"] is None
        assert row["views"] == list(pipeline.ORIENTATIONS)
        one = tiny_embedder.embed_images(pipeline.oriented(loaded.image, pipeline.ORIENTATIONS))
        assert row["vectors"].shape == (3, tiny_embedder.dim)
        np.testing.assert_allclose(row["vectors"], one, atol=1e-5)


def test_columns_round_trip_and_preprocessor_pickles(tiny_embedder) -> None:
    rows = [{"path": "a", "sha256": "1"}, {"path": "b", "error": "bad"}]
    columns = pipeline.columns_of(rows)
    assert columns == {"path": ["a", "b"], "sha256": ["1", None], "error": [None, "bad"]}
    assert pipeline.rows_of(columns)[1] == {"path": "b", "sha256": None, "error": "bad"}
    clone = pickle.loads(pickle.dumps(tiny_embedder.preprocessor))
    picture = images.load_image(
        synth.png_bytes(synth.render_view(synth.design_systems(1)[0], seed=1, query=True))
    )
    assert np.array_equal(clone(picture.image), tiny_embedder.preprocessor(picture.image))


def test_engine_keeps_order_and_batcher_counts_views() -> None:
    engine = pipeline.LocalEngine(workers=3, batch_size=4)
    assert list(engine.map(lambda n: n * n, range(50))) == [n * n for n in range(50)]
    batcher = pipeline.Batcher(6)
    three = {"pixels": np.zeros((3, 3, 2, 2), np.float32)}
    assert batcher.add(dict(three)) is None
    assert batcher.add({"error": "bad"}) is None  # failed rows ride along, cost nothing
    full = batcher.add(dict(three))
    assert full is not None and len(full) == 3 and batcher.take() == []


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread niceness")
def test_decode_threads_yield_relative_to_the_process_niceness() -> None:
    """Decode threads sit DECODE_NICE below whatever ran them, so a niced run (cron's
    `nice -n 10 raiox reindex`) still puts the model's threads first."""
    seen: list[int] = []

    def niced_run() -> None:  # its own thread: niceness set here never comes back down
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 3)
        engine = pipeline.LocalEngine(workers=2, batch_size=2)
        seen.extend(engine.map(lambda _: os.getpriority(os.PRIO_PROCESS, 0), range(4)))

    thread = threading.Thread(target=niced_run)
    thread.start()
    thread.join()
    assert seen == [3 + pipeline.DECODE_NICE] * 4


@pytest.mark.slow
def test_fresh_embedded_home_ingests_without_init_db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAIOX_DATABASE_URL", raising=False)
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    info = synth.make_catalogue(tmp_path / "synth", systems=2, views=1, queries=0, size=(64, 80))
    result = CliRunner().invoke(app, ["ingest", str(info.catalogue), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == 2
    again = CliRunner().invoke(app, ["init-db"])
    assert again.exit_code == 0 and "nothing to do" in again.stdout


def test_large_images_decode_and_resize_reduced_but_embed_the_same(tiny_embedder) -> None:
    """Preprocessing version 2: reducing_gap resize and JPEG draft decoding (the
    ingest fast path) change embeddings only in the last decimals."""
    import io

    from PIL import Image

    from raiox_cli import embedding

    assert embedding.PREPROCESS_VERSION == 2
    design = synth.design_systems(1)[0]
    big = synth.render_view(design, seed=3, query=False, size=(1600, 2000))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    pre = tiny_embedder.preprocessor
    full = images.load_image(data)
    fast = images.load_image(data, decode_to=pre.decode_to)
    assert (fast.width, fast.height) == (full.width, full.height) == big.size
    assert min(fast.image.size) < min(full.image.size) and min(fast.image.size) >= pre.decode_to
    exact = tiny_embedder.transform(full.image)  # open_clip's own resize: version 1
    import torch

    stacked = np.stack([exact.numpy(), pre(full.image), pre(fast.image)])
    vectors = tiny_embedder.embed_tensors(torch.from_numpy(stacked))
    assert float(vectors[0] @ vectors[1]) > 0.9999 and float(vectors[0] @ vectors[2]) > 0.999
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap
    big.save(rotated, format="JPEG", exif=exif)
    turned = images.load_image(rotated.getvalue(), decode_to=pre.decode_to)
    assert (turned.width, turned.height) == (big.height, big.width)
