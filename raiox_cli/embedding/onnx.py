"""The ONNX Runtime backend: the image tower exported once, then run without torch.

Search, ingest, batch search and the server on a CPU never need torch, torchvision
or open_clip: the model's image tower is exported to ONNX the first time it is used
(torch loads it once for that), kept under RAIOX_HOME, and every later process only
imports onnxruntime and numpy. Preprocessing is embedding/preprocess.py (Pillow and
numpy), whose config travels in the export's metadata.

The cache folder is `$RAIOX_HOME/onnx/<model id>-p<PREPROCESS_VERSION>/`:

    visual.onnx       the image tower's graph, (N, 3, S, S) float32 -> (N, D), N dynamic
    visual.onnx.data  its weights, as ONNX external data: ONNX Runtime maps them
                      instead of parsing and copying them out of a protobuf (half
                      the load CPU and ~110 MiB less peak memory on ViT-B-32)
    export.json       model id, preprocessing version and config, dim, opset,
                      exporter, size and sha256 of both files (with the mtime they
                      were verified at), the max abs difference to torch at export

A new model id or preprocessing version is a new folder, so the cache cannot serve a
stale model. Exports are built in a temporary folder and renamed into place under a
lock file, so concurrent processes never read half a file and export only once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raiox_cli.embedding import precision
from raiox_cli.embedding import preprocess as preprocessing
from raiox_cli.embedding import torch as torch_runtime
from raiox_cli.embedding.base import Embedding, ModelSpec, model_id, observed
from raiox_cli.embedding.preprocess import Preprocess, PreprocessConfig
from raiox_cli.errors import BackendUnavailable, ModelUnavailable
from raiox_cli.files import atomic_write_json, locked, sha256_of

if TYPE_CHECKING:
    from raiox_cli.embedding.torch import TorchEmbedder

log = logging.getLogger(__name__)

OPSET = 18
MODEL_FILE = "visual.onnx"
DATA_FILE = "visual.onnx.data"
FILES = (MODEL_FILE, DATA_FILE)
META_FILE = "export.json"
# Max abs difference allowed between the exported graph's unit vectors and torch's
# on the verification batch. float32 kernels that sum in another order differ by
# ~1e-6 per component (measured: 3e-6 on ViT-B-32's raw features); 1e-4 still
# guarantees cosine >= 1 - D * 1e-8 / 2 > 0.99999 for D <= 1024, and any real
# export bug (a wrong op, a frozen batch size, a missing layer) is orders above it.
TOLERANCE = 1e-4
VERIFY_BATCH = 3  # odd, and not the export's example batch of 2: proves N is dynamic
# Images per ONNX Runtime run: its arena keeps the largest run's activations, so an
# ingest batch of 32 in one run peaked at 871 MiB on ViT-B-32-256, runs of 8 at 539
# MiB, for the same CPU per image (bench/README.md, "Cold start").
RUN_CHUNK = 8
# A process starts on a session without pre-packed weights (a cold search embeds one
# to three images: pre-packing would cost more than it saves) and replaces it with a
# pre-packed one once it has embedded this many (ingest, server). The old session is
# dropped first: both at once took an ingest's peak from 626 to 973 MiB.
PREPACK_AFTER = 48
# ORT's idle intra-op threads spin (busy-wait) for the next job by default; they then
# compete with decode threads and PostgreSQL for 2 cores (bench/README.md, "Cold start").
ALLOW_SPINNING = "0"
INSTALL_HINT = (
    'ONNX Runtime is not installed; run "pip install onnxruntime" or set RAIOX_BACKEND=torch'
)


class ExportError(ModelUnavailable):
    """The model cannot run on ONNX Runtime: its preprocessing is not one
    preprocess.py reproduces, neither exporter handles it, or the exported graph
    does not reproduce the torch model. With RAIOX_BACKEND=auto, torch runs it."""


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401  (start-up time: only asked, not loaded, here)
    except ImportError:
        return False
    return True


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime  # start-up time: imported by the first session only
    except ImportError as exc:
        raise BackendUnavailable(INSTALL_HINT) from exc
    return onnxruntime


def cache_dir(home: Path, model_id: str, version: int | None = None) -> Path:
    """Where one model's export lives: the id made file-name safe, plus the
    preprocessing version (a bump gives a new folder, never a stale export)."""
    version = preprocessing.PREPROCESS_VERSION if version is None else version
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._") or "model"
    return home / "onnx" / f"{safe}-p{version}"


@dataclass(frozen=True)
class Export:
    """A verified export on disk and what its metadata says."""

    folder: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["preprocess"])


def cached_export(folder: Path, model_id: str, version: int | None = None) -> Export | None:
    """The export in `folder` if it is complete and intact, else None. The sha256 of
    a file (350 MB of weights for ViT-B-32) is recomputed only when its size or
    mtime differs from what was last verified."""
    version = preprocessing.PREPROCESS_VERSION if version is None else version
    try:
        meta = json.loads((folder / META_FILE).read_text())
        stats = {name: (folder / name).stat() for name in FILES}
        files = meta["files"]
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("model_id") != model_id or meta.get("preprocess_version") != version:
        return None
    rehashed = False
    for name, stat in stats.items():
        known = files.get(name, {})
        if stat.st_size != known.get("size"):
            log.warning("cached ONNX export %s has the wrong size; exporting again", folder)
            return None
        if stat.st_mtime_ns != known.get("verified_mtime_ns"):
            if sha256_of(folder / name) != known.get("sha256"):
                log.warning("cached ONNX export %s is corrupt (sha256); exporting again", folder)
                return None
            known["verified_mtime_ns"] = stat.st_mtime_ns
            rehashed = True
    if rehashed:
        with contextlib.suppress(OSError):  # a read-only home still works, it re-hashes
            atomic_write_json(folder / META_FILE, meta)
    return Export(folder, meta)


def _export_lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    """One exporter per model and home at a time (others wait, then reuse it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return locked(folder.parent / f".{folder.name}.lock")


def is_exported(spec: ModelSpec, home: Path) -> bool:
    """Whether spec's model has an intact export under home (no torch, no export)."""
    mid = model_id(spec)
    return cached_export(cache_dir(home, mid), mid) is not None


def ensure_export(
    spec: ModelSpec,
    home: Path,
    *,
    embedder: TorchEmbedder | None = None,
    samples: precision.SampleSource | None = None,
) -> Export:
    """The verified export of spec's model under home, exporting it when missing,
    stale or corrupt (with torch: loads the model once, unless `embedder` is given).
    An int8 spec's export is quantised from the fp32 one, through the parity gate on
    `samples` (synthetic implant radiographs when None)."""
    mid = model_id(spec)
    folder = cache_dir(home, mid)
    found = cached_export(folder, mid)
    if found is not None:
        return found
    with _export_lock(folder):
        found = cached_export(folder, mid)  # another process may have just built it
        if found is not None:
            return found
        if spec.precision == "int8":
            source = ensure_export(replace(spec, precision="fp32"), home, embedder=embedder)
            return _quantise(spec, source, folder, samples)
        return _export(spec, folder, embedder)


def _export(spec: ModelSpec, folder: Path, embedder: TorchEmbedder | None) -> Export:
    started = time.perf_counter()
    if embedder is None:
        # Exported on the CPU (the ONNX backend runs there), not kept in the torch cache.
        embedder = torch_runtime.load(replace(spec, device="cpu", precision="fp32"))
    config = getattr(embedder.preprocessor, "config", None)
    if not isinstance(config, PreprocessConfig):
        raise ExportError(
            f"{embedder.model_id}'s preprocessing is not one the ONNX backend reproduces; "
            "set RAIOX_BACKEND=torch"
        )
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        try:
            exporter = _export_graph(embedder, config.size, tmp / MODEL_FILE)
        except Exception as exc:  # both exporters failed: torch raises many classes
            raise ExportError(
                f"{embedder.model_id} cannot be exported to ONNX ({exc}); set RAIOX_BACKEND=torch"
            ) from exc
        _externalise(tmp / MODEL_FILE)
        max_diff = verify(embedder, tmp / MODEL_FILE, config)
        for path in tmp.iterdir():  # mkdtemp is private; the server and cron may be others
            path.chmod(0o644)
        tmp.chmod(0o755)
        meta = {
            "model_id": embedder.model_id,
            "preprocess_version": preprocessing.PREPROCESS_VERSION,
            "preprocess": config.to_dict(),
            "dim": embedder.dim,
            "opset": OPSET,
            "exporter": exporter,
            "files": {name: _file_record(tmp / name) for name in FILES},
            "max_abs_diff": max_diff,
            "tolerance": TOLERANCE,
        }
        atomic_write_json(tmp / META_FILE, meta)
        (tmp / META_FILE).chmod(0o644)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.warning(
        "exported %s's image tower to ONNX in %.1f s (%s, max abs diff %.1e); later runs "
        "start from %s",
        embedder.model_id,
        seconds,
        exporter,
        max_diff,
        folder,
    )
    return Export(folder, meta)


def refusal_path(folder: Path) -> Path:
    """Where a refused int8 model's figures are kept (beside its would-be folder), so
    RAIOX_PRECISION=auto does not quantise again in every process."""
    return folder.parent / f".{folder.name}.refused.json"


def refusal(spec: ModelSpec, home: Path) -> dict[str, Any] | None:
    """The parity gate's refusal of spec's int8 model, if one is on record for the
    fp32 export it would be quantised from now."""
    folder = cache_dir(home, model_id(spec))
    try:
        record = json.loads(refusal_path(folder).read_text())
        source = json.loads(
            (cache_dir(home, model_id(replace(spec, precision="fp32"))) / META_FILE).read_text()
        )
    except (OSError, ValueError):
        return None
    same = record.get("source_sha256") == source["files"][DATA_FILE]["sha256"]
    return record if same else None


def _quantise(
    spec: ModelSpec, source: Export, folder: Path, samples: precision.SampleSource | None
) -> Export:
    """Quantise the fp32 export into `folder`, or refuse (PrecisionRefused) with the
    parity gate's figures."""
    started = time.perf_counter()
    mid = model_id(spec)
    found = samples() if samples is not None else []
    kind = "catalogue"
    if len({s.label for s in found}) < precision.TOP_K + 1:
        found, kind = precision.synthetic_samples(), "synthetic"
    found = list(found)[: precision.MAX_SAMPLES]
    preprocessor = Preprocess(source.preprocess_config)
    pixels = np.stack([preprocessor(sample.image) for sample in found])
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        method = precision.quantise(source.model_path, tmp / MODEL_FILE, pixels)
        _externalise(tmp / MODEL_FILE)
        reference = _run(new_session(source.model_path), pixels)
        quantised = _run(new_session(tmp / MODEL_FILE), pixels)
        figures = precision.parity(
            reference,
            quantised,
            [sample.label for sample in found],
            source=kind,
            judge_agreement=not spec.random,
        )
        if not figures.passed:
            with contextlib.suppress(OSError):
                atomic_write_json(
                    refusal_path(folder),
                    {
                        "model_id": mid,
                        "parity": figures.to_dict(),
                        "source_sha256": source.meta["files"][DATA_FILE]["sha256"],
                    },
                )
            raise precision.PrecisionRefused(
                f"int8 refused for {source.meta['model_id']}: {figures.describe()}; "
                "keep RAIOX_PRECISION=fp32"
            )
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        meta = {
            **source.meta,
            "model_id": mid,
            "precision": "int8",
            "quantisation": method,
            "parity": figures.to_dict(),
            "source_sha256": source.meta["files"][DATA_FILE]["sha256"],
            "files": {name: _file_record(tmp / name) for name in FILES},
        }
        atomic_write_json(tmp / META_FILE, meta)
        (tmp / META_FILE).chmod(0o644)
        _replace_folder(tmp, folder)
        refusal_path(folder).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning(
        "quantised %s to int8 in %.1f s (%s); later runs start from %s",
        source.meta["model_id"],
        time.perf_counter() - started,
        figures.describe(),
        folder,
    )
    return Export(folder, meta)


def _run(session: Any, pixels: np.ndarray) -> np.ndarray:
    """Unit vectors of a batch, in runs of RUN_CHUNK images."""
    parts = np.array_split(pixels, range(RUN_CHUNK, len(pixels), RUN_CHUNK))
    return _normalise(
        np.concatenate([session.run(None, {"pixels": np.ascontiguousarray(p)})[0] for p in parts])
    )


def _file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "sha256": sha256_of(path), "verified_mtime_ns": stat.st_mtime_ns}


def _externalise(path: Path) -> None:
    """Rewrite the graph with its weights in DATA_FILE beside it (whichever exporter
    wrote it, and however it laid them out)."""
    import onnx  # start-up time: only an export needs the onnx package

    model = onnx.load(str(path))
    for stale in path.parent.glob(f"{path.name}*.data"):
        stale.unlink()  # the exporter's own external file, now loaded into `model`
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished export into place; an old (corrupt, stale) one goes aside
    first, since a folder cannot be renamed over a non-empty one."""
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        os.replace(folder, old / "export")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, folder)


def _export_graph(embedder: TorchEmbedder, size: int, path: Path) -> str:
    """Export with torch's dynamo exporter (torch's default and maintained one), and
    with the TorchScript exporter if dynamo fails on this model. Both reproduce
    ViT-B-32 and the tiny configs; dynamo's graph ran as fast or faster on CPU."""
    import torch  # start-up time: only an export needs torch

    # open_clip's encode_image is visual(x), then an optional F.normalize: export the
    # tower and normalise in numpy (float32), as the torch backend does after it.
    tower = embedder.model.visual.eval()
    example = torch.zeros(2, 3, size, size)
    names = {"input_names": ["pixels"], "output_names": ["features"], "opset_version": OPSET}
    try:
        # dynamo prints progress on stdout, which carries results: keep it out.
        with contextlib.redirect_stdout(io.StringIO()):
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                tower,
                (example,),
                str(path),
                dynamo=True,
                external_data=True,
                dynamic_shapes=({0: batch},),
                **names,
            )
        return "dynamo"
    except Exception as exc:  # the exporter raises many classes; fall back, say why
        log.info("dynamo ONNX export failed (%s); trying the TorchScript exporter", exc)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # its own deprecation notice
        torch.onnx.export(
            tower,
            (example,),
            str(path),
            dynamo=False,
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            **names,
        )
    return "torchscript"


def verify(embedder: TorchEmbedder, path: Path, config: PreprocessConfig) -> float:
    """Max abs difference between the export's unit vectors and torch's on a few
    synthetic radiograph-like images; raises ExportError above TOLERANCE."""
    pixels = np.stack([Preprocess(config)(img) for img in _verification_images(config.size)])
    expected = embedder.embed_tensors(pixels)
    session = new_session(path)
    got = _normalise(session.run(None, {"pixels": pixels})[0])
    if got.shape != expected.shape:
        raise ExportError(f"ONNX export gives shape {got.shape}, torch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not diff <= TOLERANCE:
        raise ExportError(
            f"ONNX export of {embedder.model_id} differs from torch by {diff:.2e} "
            f"(tolerance {TOLERANCE:.0e}); set RAIOX_BACKEND=torch"
        )
    return diff


def _verification_images(size: int) -> list[Image.Image]:
    """Seeded, various sizes and modes (grey and RGB, portrait and landscape)."""
    rng = np.random.default_rng(16)
    shapes = [(size + 37, size * 2, 1), (size * 3, size + 5, 3), (size, size, 1)]
    out = []
    for i, (w, h, channels) in enumerate(shapes[:VERIFY_BATCH]):
        ramp = np.linspace(0, 255, w * h, dtype=np.float32).reshape(h, w)
        noise = rng.normal(0, 40, (h, w, channels)).astype(np.float32)
        data = np.clip(ramp[..., None] * (0.4 + 0.2 * i) + noise, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(data[..., 0] if channels == 1 else data))
    return out


def _normalise(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float32, copy=False)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, np.float32(1e-12))


def intra_op_threads() -> int:
    """The cores this process may run on (containers and taskset limit them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def new_session(path: Path, *, prepack: bool = False) -> Any:
    """An ONNX Runtime CPU session. Spinning is off: ORT's idle threads otherwise
    spin on the cores the decode threads and PostgreSQL want (measured in
    bench/README.md), and a search runs one forward pass anyway. Without
    `prepack` the session starts in 0.09 instead of 0.43 CPU s (ViT-B-32-256) and
    each forward pass costs a little more (+0.06 s for one image, +4% at 8)."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", ALLOW_SPINNING)
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    options.log_severity_level = 3  # errors only: its warnings are not the user's to act on
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEmbedder(Embedding):
    """The image tower on ONNX Runtime, behind the interface every runtime shares
    (what ingest, search, the pipeline and the server use). Thread-safe."""

    device = "cpu"
    backend = "onnx"

    def __init__(self, spec: ModelSpec, export: Export, session: Any):
        self.spec = spec
        self.model_id = str(export.meta["model_id"])
        self.dim = export.dim
        self.preprocessor = Preprocess(export.preprocess_config)
        self.preprocess_version = int(export.meta["preprocess_version"])
        self.export = export
        self.session = session
        self.prepacked = False
        self._embedded = 0
        self._lock = threading.Lock()

    def embed_tensors(self, pixels: Any) -> np.ndarray:
        """A batch (N, 3, H, W) of preprocessed images -> (N, dim) unit float32 vectors."""
        batch = np.asarray(pixels, dtype=np.float32)
        # One forward at a time: each already uses every core (intra-op threads).
        with self._lock:
            started = time.perf_counter()
            vectors = _run(self.session, batch)
            self._embedded += len(batch)
            if self._embedded >= PREPACK_AFTER and not self.prepacked:
                self._prepack()
        observed(len(vectors), time.perf_counter() - started)
        return vectors

    def _prepack(self) -> None:
        """Replace the session with one whose weights are pre-packed (under the lock:
        0.4 s once, in exchange for ~4% less CPU per image from then on)."""
        self.prepacked = True
        self.session = None  # its arena and buffers go before the new ones come
        try:
            self.session = new_session(self.export.model_path, prepack=True)
        except Exception as exc:  # ORT's errors subclass Exception
            log.info("could not build a pre-packed ONNX Runtime session: %s", exc)
            self.session = new_session(self.export.model_path)


def load(spec: ModelSpec, home: Path) -> OnnxEmbedder:
    """The ONNX embedder for spec: from the cache, or exported now. An export that
    ONNX Runtime refuses (a damaged file with intact metadata) is rebuilt once."""
    _import_onnxruntime()
    export = ensure_export(spec, home)
    try:
        session = new_session(export.model_path)
    except Exception as exc:  # ORT's load errors (InvalidProtobuf, Fail...) subclass Exception
        log.warning("ONNX Runtime refused %s (%s); exporting again", export.model_path, exc)
        with _export_lock(export.folder):
            shutil.rmtree(export.folder, ignore_errors=True)
        export = ensure_export(spec, home)
        session = new_session(export.model_path)
    return OnnxEmbedder(spec, export, session)
