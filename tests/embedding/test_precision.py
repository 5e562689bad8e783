"""int8: the quantised image tower, its parity gate, its cache, and precision as
part of the model id (refused like another model, switched through reindex)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx as onnx_format
import pytest
from typer.testing import CliRunner

from raiox_cli import config, db, embedding, images
from raiox_cli.catalogue import reindex as core
from raiox_cli.catalogue.ingest import ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.db import queries
from raiox_cli.embedding import onnx, precision
from raiox_cli.errors import ModelMismatch
from raiox_cli.search import query as search_core
from raiox_cli.training import synth

runner = CliRunner()
SMALL = (64, 80)


def _spec(precision_: str, home: Path, backend: str = "onnx") -> embedding.ModelSpec:
    return embedding.ModelSpec("raiox-tiny", "none", None, "cpu", backend, home, precision_)


@pytest.fixture(scope="session")
def int8_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RAIOX_HOME with the tiny model's fp32 export and its int8 quantisation."""
    home = tmp_path_factory.mktemp("int8-home")
    onnx.ensure_export(_spec("int8", home), home)
    return home


@pytest.fixture
def fp32_only(int8_home: Path, tmp_path: Path) -> Path:
    """A private home holding a copy of the fp32 export only (int8 not made yet)."""
    home = tmp_path / "home"
    fp32 = onnx.cache_dir(int8_home, "raiox-tiny:none")
    shutil.copytree(fp32, home / "onnx" / fp32.name)
    return home


@pytest.fixture
def onnx_env(raiox_env: config.Settings, int8_home: Path, monkeypatch: pytest.MonkeyPatch):
    """The test's RAIOX_HOME on ONNX Runtime, with the session's exports linked in."""
    raiox_env.home.mkdir(parents=True, exist_ok=True)
    (raiox_env.home / "onnx").symlink_to(int8_home / "onnx")
    monkeypatch.setenv("RAIOX_BACKEND", "onnx")
    return config.resolve()


def _quantisations(caplog: pytest.LogCaptureFixture) -> int:
    return sum("quantised" in r.getMessage() for r in caplog.records if r.name == onnx.__name__)


def _pictures() -> list:
    return [
        synth.render_view(design, seed=3, query=True, size=(90, 120))
        for design in synth.design_systems(6, seed=9)
    ]


@pytest.mark.slow  # exports the tiny model (torch), quantises it
def test_int8_is_exported_beside_fp32_through_the_gate(int8_home: Path) -> None:
    fp32 = embedding.load_embedder(_spec("fp32", int8_home))
    int8 = embedding.load_embedder(_spec("int8", int8_home))
    assert isinstance(int8, onnx.OnnxEmbedder)
    assert (fp32.model_id, int8.model_id) == ("raiox-tiny:none", "raiox-tiny:none@int8")
    assert int8.export.folder.parent == fp32.export.folder.parent
    assert int8.dim == fp32.dim and int8.preprocess_version == fp32.preprocess_version
    meta = int8.export.meta
    assert meta["precision"] == "int8" and meta["quantisation"]["ops"] == ["MatMul", "Gemm"]
    assert meta["quantisation"]["kept_fp32_products"] > 0  # attention's Q.K and A.V
    assert meta["source_sha256"] == fp32.export.meta["files"][onnx.DATA_FILE]["sha256"]
    gate = meta["parity"]
    assert gate["passed"] and gate["source"] == "synthetic" and gate["images"] == 64
    assert gate["mean_cosine"] >= precision.GATE_COSINE
    assert gate["agreement_judged"] is False  # random weights rank implants by noise
    # int8 weights (the patch convolution and embeddings stay fp32): a smaller file
    size = (int8.export.folder / onnx.DATA_FILE).stat().st_size
    assert size < 0.6 * (fp32.export.folder / onnx.DATA_FILE).stat().st_size
    pictures = _pictures()
    got, expected = int8.embed_images(pictures), fp32.embed_images(pictures)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)
    assert np.sum(got * expected, axis=1).min() >= 0.99


def test_the_gate_figures() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"implant-{i // 2}" for i in range(12)]
    assert precision.top_k_agreement(vectors, vectors, labels) == 1.0
    shuffled = vectors[rng.permutation(12)]
    assert precision.top_k_agreement(vectors, shuffled, labels) < 0.9
    figures = precision.parity(vectors, vectors, labels, source="catalogue", judge_agreement=True)
    assert figures.passed and figures.mean_cosine == pytest.approx(1.0)
    noisy = precision.parity(vectors, shuffled, labels, source="catalogue", judge_agreement=True)
    assert not noisy.passed
    assert "top-3 implant agreement" in noisy.describe() and "mean cosine" in noisy.describe()


@pytest.mark.slow
def test_the_int8_export_is_reused_and_repaired(
    fp32_only: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=onnx.__name__)
    spec = _spec("int8", fp32_only)
    first = onnx.ensure_export(spec, fp32_only)
    assert onnx.ensure_export(spec, fp32_only).meta == first.meta
    assert _quantisations(caplog) == 1  # once, then from the cache
    data = first.folder / onnx.DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    repaired = onnx.load(spec, fp32_only)
    assert _quantisations(caplog) == 2
    assert any("corrupt" in r.getMessage() for r in caplog.records)

    def hashes(meta: dict) -> dict:
        return {name: record["sha256"] for name, record in meta["files"].items()}

    assert hashes(repaired.export.meta) == hashes(first.meta)  # quantisation is deterministic
    assert repaired.embed_images(_pictures()[:2]).shape == (2, repaired.dim)


def _broken_quantise(src: Path, dst: Path, calibration: np.ndarray) -> dict:
    """A deliberately broken quantisation: every weight matrix drowned in noise."""
    model = onnx_format.load(str(src))
    rng = np.random.default_rng(1)
    for tensor in model.graph.initializer:
        weights = onnx_format.numpy_helper.to_array(tensor)
        if weights.ndim == 2 and weights.dtype == np.float32:
            noisy = weights + rng.normal(0, 3 * weights.std() + 1e-3, weights.shape)
            tensor.CopyFrom(
                onnx_format.numpy_helper.from_array(noisy.astype(np.float32), tensor.name)
            )
    onnx_format.save_model(model, str(dst))
    return {"mode": "broken"}


@pytest.mark.slow
def test_the_gate_refuses_a_broken_quantisation_and_auto_stays_fp32(
    fp32_only: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(
        precision, "quantise", lambda *args: calls.append(args[0]) or _broken_quantise(*args)
    )
    with pytest.raises(precision.PrecisionRefused) as refused:
        embedding.load_embedder(_spec("int8", fp32_only))
    message = str(refused.value)
    assert "int8 refused" in message and "RAIOX_PRECISION=fp32" in message
    assert "top-3 implant agreement" in message and "mean cosine" in message
    assert refused.value.exit_code == 4
    folder = onnx.cache_dir(fp32_only, "raiox-tiny:none@int8")
    assert not folder.exists() and not list(folder.parent.glob("*.tmp-*"))
    record = json.loads(onnx.refusal_path(folder).read_text())
    assert record["parity"]["passed"] is False and record["parity"]["mean_cosine"] < 0.99

    caplog.set_level(logging.WARNING)
    auto = _spec("auto", fp32_only)
    assert embedding.model_id(auto) == "raiox-tiny:none"
    assert embedding.load_embedder(auto).model_id == "raiox-tiny:none"
    said = [r.getMessage() for r in caplog.records if "stays on fp32" in r.getMessage()]
    assert len(said) == 1 and "int8 was refused" in said[0]
    assert len(calls) == 1  # the refusal on record: auto did not quantise again


def _catalogue(tmp_path: Path, systems: int = 4) -> synth.SynthInfo:
    return synth.make_catalogue(tmp_path / "s", systems=systems, views=2, queries=1, size=SMALL)


@pytest.mark.slow
def test_a_precision_mismatch_is_refused_naming_the_fix(onnx_env, tmp_path: Path) -> None:
    info = _catalogue(tmp_path, systems=2)
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(info.catalogue)]).exit_code == 0  # fp32
    query = str(info.query_files[0])
    result = runner.invoke(app, ["search", query], env={"RAIOX_PRECISION": "int8"})
    assert result.exit_code == 5, result.output
    assert "differs from the catalogue's raiox-tiny:none in precision" in result.stderr
    assert "RAIOX_PRECISION=fp32" in result.stderr
    assert 'raiox reindex --precision int8"' in result.stderr
    assert runner.invoke(app, ["search", query]).exit_code == 0


def _search(settings: config.Settings, spec: embedding.ModelSpec, query: Path):
    with db.connect(settings) as conn:
        return search_core.search_image(
            conn, embedding.load_embedder(spec), images.load_image(query), k=2
        )


@pytest.mark.slow
def test_a_precision_switch_goes_through_reindex_while_search_answers(
    migrated: config.Settings, int8_home: Path, tmp_path: Path
) -> None:
    home = migrated.home
    fp32 = onnx.cache_dir(int8_home, "raiox-tiny:none")
    shutil.copytree(fp32, home / "onnx" / fp32.name)  # int8 to be made from the catalogue
    settings = migrated.replace(backend="onnx")
    info = _catalogue(tmp_path)
    ingest_catalogue(settings, info.catalogue)
    query = info.query_files[0]
    fp32_spec = embedding.ModelSpec.from_settings(settings)
    before = _search(settings, fp32_spec, query)
    answers = []

    def search_meanwhile(phase: str, done: int, total: int) -> None:
        if 0 < done < total:  # some int8 rows committed: search still answers in fp32
            during = _search(settings, fp32_spec, query)
            answers.append((during.model_id, [m.key for m in during.matches]))

    switch = settings.replace(precision="int8", batch_size=2)
    report = core.reindex(switch, switch=True, progress=search_meanwhile)
    assert report.ok and report.switched, report.to_dict()
    assert (report.previous_model_id, report.model_id) == (
        "raiox-tiny:none",
        "raiox-tiny:none@int8",
    )
    assert answers and all(
        a == ("raiox-tiny:none", [m.key for m in before.matches]) for a in answers
    )
    gate = json.loads((onnx.cache_dir(home, report.model_id) / onnx.META_FILE).read_text())
    assert gate["parity"]["source"] == "catalogue" and gate["parity"]["images"] == 8
    with db.connect(settings) as conn:
        assert queries.active_model(conn).model_id == "raiox-tiny:none@int8"
        assert queries.count_embeddings(conn, "raiox-tiny:none@int8") == 8
    after = _search(settings, embedding.ModelSpec.from_settings(switch), query)
    assert after.model_id == "raiox-tiny:none@int8" and after.matches
    with pytest.raises(ModelMismatch):
        _search(settings, fp32_spec, query)
    # The nightly job keeps int8 whatever the environment says.
    again = core.reindex(settings)
    assert (again.model_id, again.switched) == ("raiox-tiny:none@int8", False)


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`raiox ARGS` in a fresh interpreter; its last stderr line lists the heavy
    modules it imported."""
    code = (
        "import atexit, sys\n"
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
def test_int8_ingest_and_search_import_no_torch(onnx_env, tmp_path: Path) -> None:
    info = _catalogue(tmp_path, systems=2)
    assert runner.invoke(app, ["init-db"]).exit_code == 0
    env = {**os.environ, "RAIOX_BACKEND": "auto", "RAIOX_PRECISION": "int8"}
    ingested = _run_cli(["ingest", str(info.catalogue), "--json"], env)
    assert ingested.returncode == 0, ingested.stderr
    assert ingested.stderr.strip().splitlines()[-1] == "IMPORTED []", ingested.stderr
    planted = info.implants[0]
    proc = _run_cli(["search", str(planted.views[0]), "--json", "--no-tta"], env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model_id"] == "raiox-tiny:none@int8"
    assert data["matches"][0]["key"] == planted.key
    assert proc.stderr.strip().splitlines()[-1] == "IMPORTED []", proc.stderr


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"RAIOX_PRECISION": "fp16", "RAIOX_BACKEND": "torch"}, "runs on a CUDA GPU"),
        ({"RAIOX_PRECISION": "int8", "RAIOX_BACKEND": "torch"}, "runs on ONNX Runtime"),
        ({"RAIOX_PRECISION": "int4"}, "RAIOX_PRECISION='int4' is not one of"),
    ],
)
def test_a_precision_the_runtime_cannot_run_is_a_usage_error(
    raiox_env, tmp_path: Path, env: dict[str, str], says: str
) -> None:
    image = tmp_path / "q.png"
    synth.render_view(synth.design_systems(1)[0], seed=0, query=True, size=SMALL).save(image)
    result = runner.invoke(app, ["embed", str(image)], env=env)
    assert result.exit_code == 2, result.output
    assert says in result.stderr


def test_cuda_autocast_runs_fp32_as_is_and_halves_through_autocast() -> None:
    """fp32 on CUDA must not build an autocast with no dtype (it raised TypeError on the
    first GPU run: `getattr(torch, None)`); fp16/bf16 autocast to their dtype."""
    import contextlib
    import warnings

    import torch

    from raiox_cli.embedding.torch import cuda_autocast

    assert isinstance(cuda_autocast("fp32"), contextlib.nullcontext)
    with cuda_autocast("fp32"):
        assert torch.ones(2).sum().item() == 2.0
    with warnings.catch_warnings():  # "CUDA is not available": this machine has no GPU
        warnings.simplefilter("ignore", UserWarning)
        assert cuda_autocast("fp16").fast_dtype == torch.float16
        assert cuda_autocast("bf16").fast_dtype == torch.bfloat16
