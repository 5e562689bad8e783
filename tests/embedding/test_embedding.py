from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raiox_cli import embedding
from raiox_cli.embedding.preprocess import Preprocess
from raiox_cli.errors import ModelUnavailable


def _images() -> list[Image.Image]:
    gradient = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (80, 1))
    return [
        Image.fromarray(gradient).convert("RGB"),
        Image.new("RGB", (120, 90), (200, 200, 200)),
        Image.fromarray(gradient.T.copy()).convert("RGB"),
    ]


def test_embeddings_are_unit_float32_of_model_dim(tiny_embedder) -> None:
    vectors = tiny_embedder.embed_images(_images(), batch_size=2)
    assert vectors.shape == (3, tiny_embedder.dim) == (3, 32)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert tiny_embedder.model_id == "raiox-tiny:none"
    assert not np.allclose(vectors[0], vectors[1])


def test_batching_does_not_change_results(tiny_embedder) -> None:
    together = tiny_embedder.embed_images(_images(), batch_size=3)
    one_by_one = tiny_embedder.embed_images(_images(), batch_size=1)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


@pytest.mark.slow
def test_random_weights_are_the_same_in_another_process(tiny_embedder, tmp_path: Path) -> None:
    image = tmp_path / "g.png"
    _images()[0].save(image)
    here = tiny_embedder.embed_images([_images()[0]])[0]
    code = (
        "import json,sys; from PIL import Image; from raiox_cli import embedding as e;"
        "m=e.load_embedder(e.ModelSpec('raiox-tiny','none',None,'cpu'));"
        f"print(json.dumps(m.embed_images([Image.open({str(image)!r}).convert('RGB')])[0].tolist()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    there = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_allclose(here, there, atol=1e-6)


def test_local_weights_file_loads_and_is_identified_by_hash(tiny_embedder, tmp_path: Path) -> None:
    import torch

    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_embedder.model.state_dict(), checkpoint)
    spec = embedding.ModelSpec("raiox-tiny", "laion2b_s34b_b79k", checkpoint, "cpu")
    loaded = embedding.load_embedder(spec)
    assert loaded.model_id.startswith("raiox-tiny:file:")
    assert loaded.model_id == embedding.model_id(spec)
    np.testing.assert_allclose(
        loaded.embed_images(_images()), tiny_embedder.embed_images(_images()), atol=1e-6
    )


def test_missing_weights_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        embedding.model_id(embedding.ModelSpec("ViT-B-32", "x", tmp_path / "nope.pt"))


def test_offline_without_cache_fails_fast_naming_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        embedding.load_embedder(embedding.ModelSpec("ViT-B-32", "laion2b_s34b_b79k", None, "cpu"))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "RAIOX_WEIGHTS" in message and "HF_HUB_OFFLINE" in message
    assert "--pretrained none" in message


@pytest.mark.slow
def test_offline_error_through_the_cli_is_one_line(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    _images()[0].save(image)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "RAIOX_HOME": str(tmp_path / "home"),
        "RAIOX_PRETRAINED": "laion2b_s34b_b79k",
        "RAIOX_MODEL": "ViT-B-32",
    }
    env.pop("RAIOX_WEIGHTS", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "raiox_cli", "embed", str(image)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 4
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not cached" in proc.stderr
    assert time.monotonic() - start < 30  # includes importing torch


def test_unknown_model_and_tag_are_named() -> None:
    with pytest.raises(ModelUnavailable, match="unknown model"):
        embedding.load_embedder(embedding.ModelSpec("ViT-Nope", "none", None, "cpu"))
    with pytest.raises(ModelUnavailable, match="no pretrained weights"):
        embedding.load_embedder(embedding.ModelSpec("raiox-tiny", "laion2b_s34b_b79k", None, "cpu"))


def test_numpy_normalisation_equals_open_clips_transform(tiny_embedder) -> None:
    """The fast preprocess path gives exactly what open_clip's own transform gives."""
    assert isinstance(tiny_embedder.preprocessor, Preprocess)  # the numpy path is in use
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    for image in [*_images(), noisy, noisy.convert("L")]:
        fast = tiny_embedder.preprocess(image)
        reference = tiny_embedder.transform(image)
        assert fast.dtype == reference.dtype and fast.shape == reference.shape
        assert float((fast - reference).abs().max()) == 0.0
    # images.load_image keeps grey radiographs one channel: same tensor as RGB.
    grey = noisy.convert("L")
    converted = tiny_embedder.transform(grey.convert("RGB"))
    assert float((tiny_embedder.preprocess(grey) - converted).abs().max()) == 0.0


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_preprocessing_is_open_clips_transform_for_many_sizes(tiny_embedder, mode) -> None:
    """preprocess.Preprocess (Pillow + numpy, no torch) gives exactly open_clip's
    tensor for grey and colour images of many shapes: upscaled, odd crop offsets
    (torchvision's rounding), portrait, landscape, square, one pixel wide. Above 4x
    the model's size, reducing_gap changes the last decimals (test_pipeline)."""
    rng = np.random.default_rng(7)
    pre = tiny_embedder.preprocessor
    assert isinstance(pre, Preprocess)
    for width, height in [(64, 64), (65, 64), (64, 67), (31, 90), (250, 97), (101, 250), (1, 9)]:
        channels = (height, width) if mode == "L" else (height, width, 3)
        image = Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode)
        fast = pre(image)
        reference = tiny_embedder.transform(image).numpy()
        assert fast.dtype == np.float32 and fast.shape == reference.shape == (3, 64, 64)
        assert float(np.abs(fast - reference).max()) == 0.0, (width, height)


def test_preprocessing_config_round_trips_and_refuses_what_it_cannot_do(tiny_embedder) -> None:
    from raiox_cli.embedding.preprocess import PreprocessConfig, UnsupportedPreprocessing

    config = tiny_embedder.preprocessor.config
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for odd in [{"size": (64, 96)}, {"resize_mode": "squash"}, {"interpolation": "lanczos"}]:
        with pytest.raises(UnsupportedPreprocessing):
            PreprocessConfig.from_open_clip({"size": 64, **odd})
