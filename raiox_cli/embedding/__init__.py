"""THE embedding package: the only code that touches the CLIP model.

This module only chooses a runtime and loads the model on it, once per process:

    base.py        ModelSpec, model_id, the Embedding base class every runtime shares
    torch.py       open_clip's model on torch (CUDA, and always for `raiox adapt`)
    onnx.py        the image tower exported once, run on ONNX Runtime without torch
    precision.py   int8: the tower quantised by ONNX Runtime, behind a parity gate
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
from dataclasses import replace
from pathlib import Path

from raiox_cli import config
from raiox_cli.config import BACKENDS
from raiox_cli.embedding import base, onnx, precision
from raiox_cli.embedding import torch as torch_runtime
from raiox_cli.embedding.base import (
    EmbeddedFile,
    Embedding,
    FailedFile,
    ModelSpec,
    embed_files,
    forward_observers,
    parse_model_id,
    warn_if_random,
    weights_file,
)
from raiox_cli.embedding.precision import PrecisionRefused
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
    "PrecisionRefused",
    "TorchEmbedder",
    "cuda_possible",
    "embed_files",
    "forward_observers",
    "load_embedder",
    "load_trainable",
    "model_id",
    "parse_model_id",
    "preload",
    "prepare_backend",
    "register_bundled_configs",
    "resolve",
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


INT8_RUNTIME = (
    "RAIOX_PRECISION=int8 runs on ONNX Runtime on the CPU; set RAIOX_BACKEND=onnx (or auto) "
    "and RAIOX_DEVICE=cpu, or use RAIOX_PRECISION=fp16 on a CUDA GPU"
)


def resolve_backend(spec: ModelSpec) -> str:
    """Which backend runs spec, "torch" or "onnx": RAIOX_BACKEND when it names one,
    else (auto) ONNX Runtime on the CPU when it is installed, torch on a CUDA GPU.
    int8 runs on ONNX Runtime only, fp16 and bf16 on torch only."""
    if spec.backend not in BACKENDS:
        raise UsageError(f"backend {spec.backend!r} is not one of {', '.join(BACKENDS)}")
    if spec.precision == "int8" and (spec.backend == "torch" or spec.device == "cuda"):
        raise UsageError(INT8_RUNTIME)
    if spec.backend == "onnx":
        if spec.device == "cuda":
            raise UsageError(
                "RAIOX_BACKEND=onnx runs on the CPU; use RAIOX_BACKEND=torch with --device cuda"
            )
        if spec.precision in ("fp16", "bf16"):
            raise UsageError(
                f"RAIOX_PRECISION={spec.precision} runs on torch on a CUDA GPU; "
                "use RAIOX_PRECISION=int8 or fp32 with RAIOX_BACKEND=onnx"
            )
        return "onnx"
    if spec.precision == "int8":
        return "onnx"
    if spec.backend == "torch" or spec.device == "cuda" or spec.precision in ("fp16", "bf16"):
        return "torch"
    if spec.device == "auto" and cuda_possible() and resolve_device("auto") == "cuda":
        return "torch"
    return "onnx" if onnx.onnxruntime_available() else "torch"


_resolved: dict[ModelSpec, ModelSpec] = {}
_resolve_lock = threading.Lock()


def resolve(spec: ModelSpec) -> ModelSpec:
    """spec with a concrete precision. auto is fp16 where torch runs on a CUDA GPU,
    and on ONNX Runtime int8 when the parity gate lets it (quantising now if it was
    never tried), else fp32, said once per process."""
    if spec.precision != "auto":
        return spec
    with _resolve_lock:
        if spec not in _resolved:
            _resolved[spec] = replace(spec, precision=_auto_precision(spec))
        return _resolved[spec]


def _auto_precision(spec: ModelSpec) -> str:
    concrete = replace(spec, precision="fp32")
    if resolve_backend(concrete) == "torch":
        return "fp16" if resolve_device(spec.device) == "cuda" else "fp32"
    int8 = replace(spec, precision="int8")
    refused = onnx.refusal(int8, _onnx_home(spec))
    if refused is None:
        try:
            onnx.ensure_export(int8, _onnx_home(spec))
            return "int8"
        except PrecisionRefused as exc:
            reason = str(exc)
        except onnx.ExportError as exc:
            reason = f"the model cannot run on ONNX Runtime ({exc})"
    else:
        reason = f"int8 was refused: {refused['parity']}"
    log.warning("RAIOX_PRECISION=auto stays on fp32: %s", reason)
    return "fp32"


def model_id(spec: ModelSpec) -> str:
    """The id recorded with every embedding (precision auto resolved first)."""
    return base.model_id(resolve(spec))


def _onnx_home(spec: ModelSpec) -> Path:
    return spec.home if spec.home is not None else config.home_dir()


def load_embedder(spec: ModelSpec) -> Embedding:
    """Load (once per process) the model described by spec, on its backend (callers
    never ask which: every runtime is an Embedding)."""
    warn_if_random(spec)
    spec = resolve(spec)
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
        if spec.backend != "auto" or spec.precision == "int8":
            raise
        log.warning("%s; running it on torch instead (RAIOX_BACKEND=auto)", exc)
        return torch_runtime.load(spec)


def preload(spec: ModelSpec) -> None:
    """Start loading spec's model in a background thread when ONNX Runtime runs it:
    its session is built in C++ (the GIL released) while this thread decodes the
    query and starts the database; load_embedder then waits for it. A failure is
    left for load_embedder to raise again, in the caller's thread. Only an existing
    export is preloaded."""
    if spec.precision == "auto" or spec in _cache or resolve_backend(spec) != "onnx":
        return
    if not onnx.is_exported(spec, _onnx_home(spec)):
        return  # exporting loads torch: only once the caller knows it needs the model

    def run() -> None:
        with contextlib.suppress(Exception):
            load_embedder(spec)

    threading.Thread(target=run, name="raiox-model-preload", daemon=True).start()


def prepare_backend(spec: ModelSpec, samples: precision.SampleSource | None = None) -> str | None:
    """Export spec's model for the ONNX backend now when that backend would run it
    (`raiox init-db`, `raiox reindex`), so the first search does not pay for it; an
    int8 model is quantised through the parity gate on `samples` (the catalogue's
    images; synthetic ones when None). Returns the export's folder, or None when
    torch runs the model."""
    spec = resolve(spec)
    if resolve_backend(spec) != "onnx":
        return None
    try:
        return str(onnx.ensure_export(spec, _onnx_home(spec), samples=samples).folder)
    except onnx.ExportError as exc:
        if spec.backend != "auto" or spec.precision == "int8":
            raise
        log.warning("%s; it will run on torch (RAIOX_BACKEND=auto)", exc)
        return None


def load_trainable(spec: ModelSpec) -> TorchEmbedder:
    """A private copy of the model for `raiox adapt` to train (never the process
    cache, which other code must see unchanged). Same loader as every other path,
    so the trained weights saved as a checkpoint load back through --weights.
    Training runs in fp32 whatever the precision that searches with the result."""
    return torch_runtime.load(replace(spec, precision="fp32"))
