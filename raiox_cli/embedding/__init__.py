"""THE embedding package: the only code that touches the CLIP model.

This module only chooses a runtime and loads the model on it, once per process:

    base.py        ModelSpec, model_id, the Embedding base class every runtime shares
    torch.py       open_clip's model on torch (CUDA, and always for `raiox adapt`)
    onnx.py        the image tower exported once, run on ONNX Runtime without torch
    preprocess.py  the model's preprocessing in Pillow and numpy
    tower.py       open_clip's image tower alone, loaded without waste (torch)
    checkpoints.py checkpoint hashes, remembered across processes

Importing this package imports neither torch nor onnxruntime: each runtime imports
its library when it first runs, so commands that do not embed start fast.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from raiox_cli import config
from raiox_cli.config import BACKENDS
from raiox_cli.embedding import onnx
from raiox_cli.embedding import torch as torch_runtime
from raiox_cli.embedding.base import (
    EmbeddedFile,
    Embedding,
    FailedFile,
    ModelSpec,
    embed_files,
    forward_observers,
    model_id,
    warn_if_random,
    weights_file,
)
from raiox_cli.embedding.preprocess import PREPROCESS_VERSION
from raiox_cli.embedding.torch import (
    RANDOM_SEED,
    TorchEmbedder,
    register_bundled_configs,
    resolve_device,
)
from raiox_cli.errors import UsageError

# What callers hold, whichever runtime runs the model.
Embedder = Embedding

__all__ = [
    "PREPROCESS_VERSION",
    "RANDOM_SEED",
    "EmbeddedFile",
    "Embedder",
    "Embedding",
    "FailedFile",
    "ModelSpec",
    "TorchEmbedder",
    "cuda_possible",
    "embed_files",
    "forward_observers",
    "load_embedder",
    "load_trainable",
    "model_id",
    "preload",
    "prepare_backend",
    "register_bundled_configs",
    "resolve_backend",
    "resolve_device",
    "warn_if_random",
    "weights_file",
]

log = logging.getLogger(__name__)

_cache: dict[ModelSpec, Embedding] = {}
_cache_lock = threading.Lock()


def cuda_possible() -> bool:
    """Whether this machine might have a CUDA GPU, without importing torch (1-3 s):
    the NVIDIA driver's device nodes (or WSL's GPU node) exist. Only then is torch
    asked, and on such a machine the torch backend needs torch anyway."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def resolve_backend(spec: ModelSpec) -> str:
    """Which backend runs spec, "torch" or "onnx": RAIOX_BACKEND when it names one,
    else (auto) ONNX Runtime on the CPU when it is installed, torch on a CUDA GPU."""
    if spec.backend not in BACKENDS:
        raise UsageError(f"backend {spec.backend!r} is not one of {', '.join(BACKENDS)}")
    if spec.backend == "onnx":
        if spec.device == "cuda":
            raise UsageError(
                "RAIOX_BACKEND=onnx runs on the CPU; use RAIOX_BACKEND=torch with --device cuda"
            )
        return "onnx"
    if spec.backend == "torch" or spec.device == "cuda":
        return "torch"
    if spec.device == "auto" and cuda_possible() and resolve_device("auto") == "cuda":
        return "torch"
    return "onnx" if onnx.onnxruntime_available() else "torch"


def _onnx_home(spec: ModelSpec) -> Path:
    return spec.home if spec.home is not None else config.home_dir()


def load_embedder(spec: ModelSpec) -> Embedding:
    """Load (once per process) the model described by spec, on its backend (callers
    never ask which: every runtime is an Embedding)."""
    warn_if_random(spec)
    with _cache_lock:
        if spec not in _cache:
            if resolve_backend(spec) == "onnx":
                _cache[spec] = _load_onnx(spec)
            else:
                _cache[spec] = torch_runtime.load(spec)
        return _cache[spec]


def _load_onnx(spec: ModelSpec) -> Embedding:
    """ONNX Runtime's embedder; with RAIOX_BACKEND=auto, torch's when this model
    cannot run on ONNX Runtime (say why once, on stderr)."""
    try:
        return onnx.load(spec, _onnx_home(spec))
    except onnx.ExportError as exc:
        if spec.backend != "auto":
            raise
        log.warning("%s; running it on torch instead (RAIOX_BACKEND=auto)", exc)
        return torch_runtime.load(spec)


def preload(spec: ModelSpec) -> None:
    """Start loading spec's model in a background thread when ONNX Runtime runs it:
    its session is built in C++ (the GIL released) while this thread decodes the
    query and starts the database; load_embedder then waits for it. A failure is
    left for load_embedder to raise again, in the caller's thread. Only an existing
    export is preloaded."""
    if spec in _cache or resolve_backend(spec) != "onnx":
        return
    if not onnx.is_exported(spec, _onnx_home(spec)):
        return  # exporting loads torch: only once the caller knows it needs the model

    def run() -> None:
        with contextlib.suppress(Exception):
            load_embedder(spec)

    threading.Thread(target=run, name="raiox-model-preload", daemon=True).start()


def prepare_backend(spec: ModelSpec) -> str | None:
    """Export spec's model for the ONNX backend now when that backend would run it
    (`raiox init-db`, `raiox reindex`), so the first search does not pay for it.
    Returns the export's folder, or None when torch runs the model."""
    if resolve_backend(spec) != "onnx":
        return None
    try:
        return str(onnx.ensure_export(spec, _onnx_home(spec)).folder)
    except onnx.ExportError as exc:
        if spec.backend != "auto":
            raise
        log.warning("%s; it will run on torch (RAIOX_BACKEND=auto)", exc)
        return None


def load_trainable(spec: ModelSpec) -> TorchEmbedder:
    """A private copy of the model for `raiox adapt` to train (never the process
    cache, which other code must see unchanged). Same loader as every other path,
    so the trained weights saved as a checkpoint load back through --weights."""
    return torch_runtime.load(spec)
