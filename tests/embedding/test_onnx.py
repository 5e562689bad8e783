"""The ONNX Runtime backend: parity with torch, the export cache, and a search
path that never imports torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raiox_cli import embedding
from raiox_cli.cli import app
from raiox_cli.embedding import checkpoints, onnx
from raiox_cli.embedding import preprocess as preprocessing
from raiox_cli.training import synth

runner = CliRunner()
TINY = ["raiox-tiny", "raiox-tiny48"]
SMALL = (96, 120)


def _spec(name: str, backend: str, home: Path | None = None) -> embedding.ModelSpec:
    return embedding.ModelSpec(name, "none", None, "cpu", backend, home)


@pytest.fixture(scope="session")
def export_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RAIOX_HOME whose onnx/ cache every test may share (exported once)."""
    return tmp_path_factory.mktemp("onnx-home")


@pytest.fixture
def shared_exports(raiox_env, export_home: Path) -> Path:
    """The test's own RAIOX_HOME, with the session's export cache linked in."""
    raiox_env.home.mkdir(parents=True, exist_ok=True)
    (export_home / "onnx").mkdir(exist_ok=True)
    (raiox_env.home / "onnx").symlink_to(export_home / "onnx")
    return raiox_env.home


@pytest.fixture
def tiny_export(export_home: Path, tmp_path: Path) -> Path:
    """A private RAIOX_HOME holding a copy of the session's raiox-tiny export (to
    damage, or to find cached), without exporting again."""
    shared = onnx.ensure_export(_spec("raiox-tiny", "onnx"), export_home)
    home = tmp_path / "home"
    shutil.copytree(shared.folder, home / "onnx" / shared.folder.name)
    return home


def _exports_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum("exported" in r.getMessage() for r in caplog.records if r.name == onnx.__name__)


def _images() -> list[Image.Image]:
    """Radiograph-like views and noise, grey and RGB, various shapes."""
    rng = np.random.default_rng(5)
    out = []
    for i, design in enumerate(synth.design_systems(3, seed=4)):
        out.append(synth.render_view(design, seed=i, query=bool(i % 2), size=(90 + 40 * i, 130)))
    out.append(Image.fromarray(rng.integers(0, 256, (70, 200, 3), dtype=np.uint8)))
    out.append(Image.fromarray(rng.integers(0, 256, (300, 64), dtype=np.uint8)))
    return out


@pytest.mark.parametrize("name", TINY)
def test_backends_agree_and_share_the_model_id(name: str, export_home: Path) -> None:
    torch_side = embedding.load_embedder(_spec(name, "torch"))
    onnx_side = embedding.load_embedder(_spec(name, "onnx", export_home))
    assert isinstance(onnx_side, onnx.OnnxEmbedder) and onnx_side.backend == "onnx"
    assert onnx_side.model_id == torch_side.model_id == f"{name}:none"
    assert onnx_side.dim == torch_side.dim
    assert onnx_side.preprocess_version == torch_side.preprocess_version
    assert onnx_side.meaningless
    pictures = _images()
    expected = torch_side.embed_images(pictures)
    got = onnx_side.embed_images(pictures, batch_size=2)  # a last batch of 1: dynamic N
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)
    cosines = np.sum(got * expected, axis=1)
    assert cosines.min() >= 0.9999, cosines
    twice = np.stack([onnx_side.preprocessor(p) for p in pictures * 2])
    assert len(twice) > onnx.RUN_CHUNK  # one call, several ONNX Runtime runs
    np.testing.assert_allclose(
        onnx_side.embed_tensors(twice), np.concatenate([got, got]), atol=1e-5
    )
    meta = onnx_side.export.meta
    assert meta["max_abs_diff"] <= meta["tolerance"] == onnx.TOLERANCE
    assert meta["opset"] >= 17 and meta["exporter"] in {"dynamo", "torchscript"}


@pytest.mark.slow
@pytest.mark.parametrize(("ingest_with", "search_with"), [("torch", "onnx"), ("onnx", "torch")])
def test_a_catalogue_from_one_backend_is_searchable_with_the_other(
    shared_exports: Path, tmp_path: Path, ingest_with: str, search_with: str
) -> None:
    info = synth.make_catalogue(tmp_path / "s", systems=3, views=2, queries=0, size=SMALL)
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    ingested = runner.invoke(app, ["ingest", str(info.catalogue), "--backend", ingest_with])
    assert ingested.exit_code == 0, ingested.output
    planted = info.implants[1]
    found = runner.invoke(
        app,
        ["search", str(planted.views[0]), "--json", "--no-tta", "--backend", search_with],
    )
    assert found.exit_code == 0, found.output
    data = json.loads(found.stdout)
    assert data["model_id"] == "raiox-tiny:none"
    best = data["matches"][0]
    assert best["key"] == planted.key
    assert best["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_a_model_switch_and_a_preprocessing_bump_export_again(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=onnx.__name__)
    tiny = onnx.ensure_export(_spec("raiox-tiny", "onnx"), tiny_export)
    assert tiny.meta["model_id"] == "raiox-tiny:none" and _exports_logged(caplog) == 0
    other = onnx.ensure_export(_spec("raiox-tiny48", "onnx"), tiny_export)
    assert other.folder != tiny.folder and _exports_logged(caplog) == 1
    assert (other.meta["model_id"], other.dim) == ("raiox-tiny48:none", 48)

    monkeypatch.setattr(preprocessing, "PREPROCESS_VERSION", preprocessing.PREPROCESS_VERSION + 1)
    bumped = onnx.ensure_export(_spec("raiox-tiny", "onnx"), tiny_export)
    assert bumped.folder != tiny.folder and _exports_logged(caplog) == 2
    assert bumped.meta["preprocess_version"] == preprocessing.PREPROCESS_VERSION
    assert bumped.folder.name.endswith(f"-p{preprocessing.PREPROCESS_VERSION}")
    assert tiny.model_path.is_file()  # the old version's export is left alone


def _flip_a_byte(folder: Path) -> None:
    path = folder / onnx.DATA_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    path = folder / onnx.DATA_FILE
    path.write_bytes(path.read_bytes()[:1000])


def _refused(folder: Path) -> None:
    """A graph ONNX Runtime refuses, whose size and sha256 the metadata agrees with."""
    (folder / onnx.MODEL_FILE).write_bytes(b"not an onnx graph" * 100)
    meta = json.loads((folder / onnx.META_FILE).read_text())
    meta["files"][onnx.MODEL_FILE] = onnx._file_record(folder / onnx.MODEL_FILE)
    (folder / onnx.META_FILE).write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    [_flip_a_byte, _truncate, lambda folder: (folder / onnx.MODEL_FILE).unlink(), _refused],
    ids=["sha256", "size", "missing", "refused"],
)
def test_a_corrupt_export_is_detected_and_rebuilt(
    tiny_export: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=onnx.__name__)
    spec = _spec("raiox-tiny", "onnx", tiny_export)
    first = onnx.load(spec, tiny_export)
    reference = first.embed_images(_images()[:2])
    damage(first.export.folder)
    rebuilt = onnx.load(spec, tiny_export)
    assert _exports_logged(caplog) == 1
    for name, record in rebuilt.export.meta["files"].items():
        assert checkpoints.sha256_of(rebuilt.export.folder / name) == record["sha256"]
    np.testing.assert_allclose(rebuilt.embed_images(_images()[:2]), reference, atol=1e-5)


@pytest.mark.slow
def test_an_intact_export_is_not_rehashed(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = onnx.ensure_export(_spec("raiox-tiny", "onnx"), tiny_export)
    calls = []
    monkeypatch.setattr(onnx, "sha256_of", lambda path: calls.append(path) or "x")
    assert onnx.cached_export(export.folder, "raiox-tiny:none") is not None
    assert calls == []  # size and mtime match what was verified: no 350 MB read
    weights = export.folder / onnx.DATA_FILE
    os.utime(weights, ns=(1, 1))  # touched (a copy, a restore): hash again
    assert onnx.cached_export(export.folder, "raiox-tiny:none") is None
    assert calls == [weights]


@pytest.mark.slow
def test_concurrent_first_uses_export_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=onnx.__name__)
    spec = _spec("raiox-tiny48", "onnx")
    results: list[onnx.Export] = []
    threads = [
        threading.Thread(target=lambda: results.append(onnx.ensure_export(spec, tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and _exports_logged(caplog) == 1
    assert results[0].meta["files"] == results[1].meta["files"]
    assert not [p for p in (tmp_path / "onnx").iterdir() if ".tmp-" in p.name]


def _run_cli(
    args: list[str], env: dict[str, str], prelude: str = ""
) -> subprocess.CompletedProcess:
    """`raiox ARGS` in a fresh interpreter; its last stderr line lists the heavy
    modules it imported."""
    code = (
        "import atexit, sys\n"
        f"{prelude}\n"
        "HEAVY = ('torch', 'torchvision', 'open_clip')\n"
        "atexit.register(lambda: print('IMPORTED', [m for m in HEAVY if m in sys.modules],"
        " file=sys.stderr))\n"
        f"sys.argv = ['raiox', *{args!r}]\n"
        "from raiox_cli.cli import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.slow
def test_onnx_ingest_and_search_import_no_torch(shared_exports: Path, tmp_path: Path) -> None:
    info = synth.make_catalogue(tmp_path / "s", systems=2, views=2, queries=0, size=SMALL)
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    env = {**os.environ, "RAIOX_BACKEND": "auto"}  # auto on a CPU machine is ONNX Runtime
    ingested = _run_cli(["ingest", str(info.catalogue), "--json"], env)
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["embedded"] == 4
    assert ingested.stderr.strip().splitlines()[-1] == "IMPORTED []", ingested.stderr
    planted = info.implants[0]
    proc = _run_cli(["search", str(planted.views[0]), "--json", "--no-tta"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["matches"][0]["key"] == planted.key
    assert proc.stderr.strip().splitlines()[-1] == "IMPORTED []", proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "exit_code"), [("onnx", 4), ("auto", 0)])
def test_without_onnxruntime(raiox_env, tmp_path: Path, backend: str, exit_code: int) -> None:
    image = tmp_path / "q.png"
    Image.fromarray(np.full((64, 80), 90, dtype=np.uint8)).save(image)
    env = {**os.environ, "RAIOX_BACKEND": backend}
    hide = "sys.modules['onnxruntime'] = None  # import onnxruntime raises ImportError"
    proc = _run_cli(["embed", str(image)], env, prelude=hide)
    assert proc.returncode == exit_code, proc.stderr
    if backend == "onnx":
        assert "pip install onnxruntime" in proc.stderr
        assert "Traceback" not in proc.stderr
    else:  # auto falls back to torch, with the same model id
        assert json.loads(proc.stdout)["model_id"] == "raiox-tiny:none"
        assert not (raiox_env.home / "onnx").exists()


def test_backend_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAIOX_BACKEND", "tensorrt")
    result = runner.invoke(app, ["embed", "x.png"])
    assert result.exit_code == 2
    assert "RAIOX_BACKEND='tensorrt' is not one of auto, torch, onnx" in result.output
    with pytest.raises(Exception, match="runs on the CPU"):
        embedding.resolve_backend(replace(_spec("raiox-tiny", "onnx"), device="cuda"))


def test_auto_asks_torch_about_cuda_only_where_a_gpu_may_be(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def resolve_device(requested: str) -> str:
        asked.append(requested)
        return "cuda"

    monkeypatch.setattr(embedding, "resolve_device", resolve_device)
    auto = replace(_spec("raiox-tiny", "auto"), device="auto")
    monkeypatch.setattr(embedding, "cuda_possible", lambda: False)
    assert embedding.resolve_backend(auto) == "onnx" and asked == []  # torch not imported
    monkeypatch.setattr(embedding, "cuda_possible", lambda: True)
    assert embedding.resolve_backend(auto) == "torch" and asked == ["auto"]
    assert embedding.resolve_backend(replace(auto, device="cpu")) == "onnx"
    assert embedding.resolve_backend(replace(auto, device="cuda")) == "torch"
    assert embedding.resolve_backend(replace(auto, backend="torch", device="cpu")) == "torch"


def test_a_busy_embedder_swaps_in_prepacked_weights(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx, "PREPACK_AFTER", 4)
    embedder = onnx.load(_spec("raiox-tiny", "onnx", tiny_export), tiny_export)
    pictures = _images()[:3]
    first = embedder.embed_images(pictures)
    assert not embedder.prepacked  # a search stops here
    again = embedder.embed_images(pictures)  # 6 images: past PREPACK_AFTER
    assert embedder.prepacked
    np.testing.assert_allclose(embedder.embed_images(pictures), first, atol=1e-5)
    np.testing.assert_allclose(again, first, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "onnx"])
def test_a_model_onnx_cannot_run_falls_back_to_torch_only_with_auto(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: str, caplog
) -> None:
    """An export that fails (here: its verification) stops RAIOX_BACKEND=onnx with
    the fix, and lets auto run the model on torch with one warning."""

    def differs(*args: object) -> float:
        raise onnx.ExportError("ONNX export differs from torch by 1e-2; set RAIOX_BACKEND=torch")

    monkeypatch.setattr(onnx, "verify", differs)
    spec = replace(_spec("raiox-tiny", backend, tmp_path / "home"), device="cpu")
    if backend == "onnx":
        with pytest.raises(onnx.ExportError, match="RAIOX_BACKEND=torch"):
            embedding.load_embedder(spec)
        return
    with caplog.at_level(logging.WARNING):
        embedder = embedding.load_embedder(spec)
        assert embedding.prepare_backend(spec) is None
    assert not isinstance(embedder, onnx.OnnxEmbedder)
    assert embedder.model_id == "raiox-tiny:none"
    assert any("running it on torch" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "home" / "onnx").glob("*/visual.onnx"))  # nothing half-made


@pytest.mark.slow
def test_a_first_use_exports_and_says_so_once(raiox_env, tmp_path: Path) -> None:
    """The first ONNX use in a fresh home exports (one stderr line saying so) and
    warns about random weights once, though the export loads the torch model too."""
    image = tmp_path / "q.png"
    Image.fromarray(np.full((64, 80), 90, dtype=np.uint8)).save(image)
    proc = _run_cli(["embed", str(image)], {**os.environ, "RAIOX_BACKEND": "onnx"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("MODEL HAS RANDOM WEIGHTS") == 1, proc.stderr
    assert proc.stderr.count("exported raiox-tiny:none's image tower to ONNX") == 1
    assert json.loads(proc.stdout)["model_id"] == "raiox-tiny:none"
