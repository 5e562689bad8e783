"""THE embedding module: the only code that touches the CLIP model.

Load once per process (hub cache, a local checkpoint, or seeded random weights),
preprocess PIL images into tensors, batch-embed them into L2-normalised float32
vectors. Two backends share that interface: torch (open_clip's model; CUDA, and
always for `raiox adapt`) and ONNX Runtime (embedding/onnx.py: the image tower
exported once, run without importing torch). torch and open_clip are imported
here, lazily, so commands that do not embed, and the ONNX path, start fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli.config import BACKENDS, Settings
from raiox_cli.embedding import checkpoints
from raiox_cli.embedding.preprocess import (
    PREPROCESS_VERSION,
    Preprocess,
    PreprocessConfig,
    UnsupportedPreprocessing,
)
from raiox_cli.errors import ModelUnavailable, UsageError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from raiox_cli.images import Crop

log = logging.getLogger(__name__)

RANDOM_SEED = 20240601
HUB_PROBE_TIMEOUT_S = 3.0
# Called after every forward pass with (images, seconds): the server's metrics listen.
forward_observers: list[Callable[[int, float], None]] = []
HUB_HOST = "huggingface.co"

OFFLINE_FIXES = (
    "connect to the network once to cache them, or set RAIOX_WEIGHTS=/path/to/checkpoint "
    "(see README: offline weights), or use --pretrained none for a speed-only smoke run"
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str
    weights: Path | None = None
    device: str = "auto"
    # RAIOX_BACKEND (config.BACKENDS) and where the ONNX export cache lives (a
    # spec built directly, as tests and adapt do, runs torch unless it says otherwise).
    backend: str = "torch"
    home: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        return cls(
            settings.model,
            settings.pretrained,
            settings.weights,
            settings.device,
            settings.backend,
            settings.home,
        )

    @property
    def random(self) -> bool:
        return self.weights is None and self.pretrained.lower() in {"none", "random", ""}


def model_id(spec: ModelSpec) -> str:
    """The id recorded with every embedding; computed without loading the model."""
    if spec.weights is not None:
        if not spec.weights.is_file():
            raise ModelUnavailable(f"RAIOX_WEIGHTS file {spec.weights} does not exist")
        return f"{spec.name}:file:{checkpoints.file_sha256(spec.weights)[:16]}"
    if spec.random:
        return f"{spec.name}:none"
    return f"{spec.name}:{spec.pretrained}"


class Embedding:
    """What every backend's embedder shares; each defines spec, dim, preprocessor
    and embed_tensors (numpy in, unit float32 vectors out)."""

    spec: ModelSpec
    dim: int
    preprocessor: Callable[[Image.Image], np.ndarray]

    def embed_tensors(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def meaningless(self) -> bool:
        return self.spec.random

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = np.stack([self.preprocessor(img) for img in chunk])
            out[start : start + len(chunk)] = self.embed_tensors(batch)
        return out


class Embedder(Embedding):
    """A loaded model with its preprocessing. Thread-safe for embedding calls."""

    backend = "torch"

    def __init__(self, spec: ModelSpec, model: Any, preprocess: Callable, device: str, dim: int):
        self.spec = spec
        self.model_id = model_id(spec)
        self.model = model
        self.transform = preprocess
        self.preprocessor = preprocessor_for(model, preprocess)
        self.device = device
        self.dim = dim
        self.preprocess_version = PREPROCESS_VERSION
        self._lock = threading.Lock()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Grey ("L") or RGB PIL image -> the model's input tensor (CPU). Thread-safe."""
        import torch

        return torch.from_numpy(self.preprocessor(image))

    def embed_tensors(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """A batch (N, 3, H, W) of preprocessed images -> (N, dim) unit float32 vectors."""
        import torch
        import torch.nn.functional as F

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        cuda = self.device.startswith("cuda")
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            if cuda:
                if not pixels.is_pinned():
                    pixels = pixels.pin_memory()
                pixels = pixels.to(self.device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.float16):
                    features = self.model.encode_image(pixels)
            else:
                features = self.model.encode_image(pixels)
            features = F.normalize(features.float(), dim=-1)
            vectors = features.cpu().numpy().astype(np.float32, copy=False)
        for observe in forward_observers:
            observe(len(vectors), time.perf_counter() - started)
        return vectors


class TransformPreprocess:
    """open_clip's own transform, for a model whose preprocessing preprocess.py does
    not reproduce (torch backend only): PIL image -> float32 (3, H, W)."""

    decode_to = None

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform(image.convert("RGB")).numpy()


def preprocessor_for(model: Any, transform: Any) -> Preprocess | TransformPreprocess:
    """The numpy/Pillow preprocessing when it reproduces the model's transform."""
    try:
        return Preprocess(PreprocessConfig.from_open_clip(model.visual.preprocess_cfg))
    except (AttributeError, UnsupportedPreprocessing) as exc:
        log.info("preprocessing through open_clip's transform (%s)", exc)
        return TransformPreprocess(transform)


_cache: dict[ModelSpec, Any] = {}  # Embedder or onnx.OnnxEmbedder
_cache_lock = threading.Lock()
_configs_registered = False


def register_bundled_configs() -> None:
    """Make raiox's own open_clip configs (the tiny test model) loadable by name."""
    global _configs_registered
    if _configs_registered:
        return
    import open_clip

    configs = resources.files("raiox_cli").joinpath("model_configs")
    open_clip.add_model_config(Path(str(configs)))
    _configs_registered = True


_warned_random: set[str] = set()


def warn_if_random(spec: ModelSpec) -> None:
    """Say loudly, once per process and model (an ONNX export loads the torch
    model too), that random weights make meaningless results."""
    if spec.random and spec.name not in _warned_random:
        _warned_random.add(spec.name)
        log.warning(
            "MODEL HAS RANDOM WEIGHTS (--pretrained none): embeddings are only good for "
            "speed tests and smoke runs; search results are meaningless"
        )


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
    from raiox_cli.embedding import onnx

    return "onnx" if onnx.onnxruntime_available() else "torch"


def _onnx_home(spec: ModelSpec) -> Path:
    if spec.home is not None:
        return spec.home
    from raiox_cli import config

    return config.home_dir()


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was asked for but no CUDA GPU is available")
    return requested


def load_embedder(spec: ModelSpec) -> Embedder:
    """Load (once per process) the model described by spec, on its backend (an
    onnx.OnnxEmbedder has Embedder's interface: callers never ask which)."""
    with _cache_lock:
        if spec not in _cache:
            if resolve_backend(spec) == "onnx":
                _cache[spec] = _load_onnx(spec)
            else:
                _cache[spec] = _load(spec)
        return _cache[spec]


def _load_onnx(spec: ModelSpec) -> Embedder:
    """ONNX Runtime's embedder; with RAIOX_BACKEND=auto, torch's when this model
    cannot run on ONNX Runtime (say why once, on stderr)."""
    from raiox_cli.embedding import onnx

    try:
        return onnx.load(spec, _onnx_home(spec))
    except onnx.ExportError as exc:
        if spec.backend != "auto":
            raise
        log.warning("%s; running it on torch instead (RAIOX_BACKEND=auto)", exc)
        return _load(spec)


def preload(spec: ModelSpec) -> None:
    """Start loading spec's model in a background thread when ONNX Runtime runs it:
    its session is built in C++ (the GIL released) while this thread decodes the
    query and starts the database; load_embedder then waits for it. A failure is
    left for load_embedder to raise again, in the caller's thread. Only an existing
    export is preloaded."""
    if spec in _cache or resolve_backend(spec) != "onnx":
        return
    from raiox_cli.embedding import onnx

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
    from raiox_cli.embedding import onnx

    try:
        return str(onnx.ensure_export(spec, _onnx_home(spec)).folder)
    except onnx.ExportError as exc:
        if spec.backend != "auto":
            raise
        log.warning("%s; it will run on torch (RAIOX_BACKEND=auto)", exc)
        return None


def load_trainable(spec: ModelSpec) -> Embedder:
    """A private copy of the model for `raiox adapt` to train (never the process
    cache, which other code must see unchanged). Same loader as every other path,
    so the trained weights saved as a checkpoint load back through --weights."""
    return _load(spec)


def _load(spec: ModelSpec) -> Embedder:
    import open_clip
    import torch

    from raiox_cli.embedding import tower

    register_bundled_configs()
    if spec.name not in open_clip.list_models():
        raise ModelUnavailable(
            f"unknown model {spec.name!r}; see open_clip.list_models() (e.g. ViT-B-32)"
        )
    device = resolve_device(spec.device)
    checkpoint = _checkpoint_path(spec)
    warn_if_random(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)  # random weights are the same in every process
        try:
            if tower.supported(spec.name, checkpoint):
                model, preprocess = tower.build(
                    spec.name, checkpoint, device, _pretrained_cfg(spec)
                )
            else:  # open_clip's whole model (CoCa, big_vision .npz files)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=checkpoint, device=device
                )
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ModelUnavailable(
                f"could not load {spec.name} weights from {checkpoint}: {exc}"
            ) from exc
    model.eval()
    # timm-backed towers (open_clip's TimmModel) have no output_dim: the config says
    dim = (
        getattr(model.visual, "output_dim", None)
        or open_clip.get_model_config(spec.name)["embed_dim"]
    )
    return Embedder(spec, model, preprocess, device, int(dim))


def _pretrained_cfg(spec: ModelSpec) -> dict[str, Any] | None:
    """A pretrained tag's preprocessing (mean, std, resize mode), as open_clip merges it."""
    if spec.weights is not None or spec.random:
        return None
    import open_clip

    return open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or None


def _checkpoint_path(spec: ModelSpec) -> str | None:
    """A local file with the weights, or None for random weights. Never waits on a
    network that is not there: offline, this fails in seconds with the fixes."""
    if spec.weights is not None:
        model_id(spec)  # raises when the file is missing
        return str(spec.weights)
    if spec.random:
        return None
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none known"
        raise ModelUnavailable(
            f"{spec.name} has no pretrained weights {spec.pretrained!r} (known: {tags}; "
            "or --pretrained none for random weights)"
        )
    cached = _cached_checkpoint(cfg)
    if cached:
        return cached
    reason = _offline_reason()
    if reason:
        raise ModelUnavailable(
            f"weights {spec.name}:{spec.pretrained} are not cached and {reason}; " + OFFLINE_FIXES
        )
    try:
        return str(open_clip.download_pretrained(cfg))
    except Exception as exc:  # hub errors come in many classes
        raise ModelUnavailable(
            f"downloading {spec.name}:{spec.pretrained} failed ({exc}); " + OFFLINE_FIXES
        ) from exc


def _cached_checkpoint(cfg: dict) -> str | None:
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo.rstrip("/"), name)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _offline_reason() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{HUB_HOST} is unreachable ({exc.strerror or exc})"
    return None


@dataclass(frozen=True)
class EmbeddedFile:
    path: str
    vector: np.ndarray


@dataclass(frozen=True)
class FailedFile:
    path: str
    reason: str


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    crop: Crop | None = None,
) -> tuple[list[EmbeddedFile], list[FailedFile]]:
    """Decode (through images.load_image) and embed files; bad files are reported,
    never fatal. Decoding is chunked so memory stays bounded for long lists."""
    from raiox_cli import images

    limits: dict[str, int] = {}
    if max_pixels is not None:
        limits["max_pixels"] = max_pixels
    if max_bytes is not None:
        limits["max_bytes"] = max_bytes
    done: list[EmbeddedFile] = []
    failed: list[FailedFile] = []
    for start in range(0, len(paths), batch_size):
        names, tensors = [], []
        for path in paths[start : start + batch_size]:
            try:
                loaded = images.load_image(path, crop=crop, **limits)
            except images.ImageError as exc:
                failed.append(FailedFile(str(path), str(exc)))
                continue
            names.append(str(path))
            tensors.append(embedder.preprocessor(loaded.image))
        if tensors:
            vectors = embedder.embed_tensors(np.stack(tensors))
            done.extend(EmbeddedFile(n, v) for n, v in zip(names, vectors, strict=True))
    return done, failed
