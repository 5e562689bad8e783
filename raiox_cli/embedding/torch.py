"""The torch runtime: open_clip's model (CUDA with fp16 autocast, and always for
`raiox adapt`). torch and open_clip are imported inside the functions that need
them, never at module level: importing this module must stay free, since the
chooser (embedding/__init__) and the ONNX exporter import it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli.embedding.base import Embedding, ModelSpec, model_id, observed
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

log = logging.getLogger(__name__)

RANDOM_SEED = 20240601
HUB_PROBE_TIMEOUT_S = 3.0
HUB_HOST = "huggingface.co"
# The precisions torch runs through CUDA autocast (torch dtype names); fp32 runs as is.
AUTOCAST = {"fp16": "float16", "bf16": "bfloat16"}


def cuda_autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to fp16/bf16 on CUDA for those precisions; fp32 runs as is (no context:
    torch.autocast takes no dtype for "off", and a None one fails before `enabled`)."""
    import torch

    half = AUTOCAST.get(precision)
    if half is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, half))


OFFLINE_FIXES = (
    "connect to the network once to cache them, or set RAIOX_WEIGHTS=/path/to/checkpoint "
    "(see docs/guides/backends.md: model weights offline), or use --pretrained none for a "
    "speed-only smoke run"
)


class TorchEmbedder(Embedding):
    """open_clip's model (its image tower) on torch. Thread-safe for embedding calls."""

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
        import torch  # start-up time: this module is imported where torch is not needed

        return torch.from_numpy(self.preprocessor(image))

    def embed_tensors(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """A batch (N, 3, H, W) of preprocessed images -> (N, dim) unit float32 vectors."""
        import torch  # start-up time, as above
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
                with cuda_autocast(self.spec.precision):
                    features = self.model.encode_image(pixels)
            else:
                features = self.model.encode_image(pixels)
            features = F.normalize(features.float(), dim=-1)
            vectors = features.cpu().numpy().astype(np.float32, copy=False)
        observed(len(vectors), time.perf_counter() - started)
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


_configs_registered = False


def register_bundled_configs() -> None:
    """Make raiox's own open_clip configs (the tiny test model) loadable by name."""
    global _configs_registered
    if _configs_registered:
        return
    import open_clip  # start-up time: open_clip imports torch

    configs = resources.files("raiox_cli").joinpath("model_configs")
    open_clip.add_model_config(Path(str(configs)))
    _configs_registered = True


def resolve_device(requested: str) -> str:
    import torch  # start-up time

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was asked for but no CUDA GPU is available")
    return requested


def load(spec: ModelSpec) -> TorchEmbedder:
    """Build spec's model on torch (a new copy each call: the chooser caches)."""
    import open_clip  # start-up time
    import torch

    from raiox_cli.embedding import tower  # start-up time: it imports torch and open_clip

    register_bundled_configs()
    if spec.name not in open_clip.list_models():
        raise ModelUnavailable(
            f"unknown model {spec.name!r}; see open_clip.list_models() (e.g. ViT-B-32)"
        )
    device = resolve_device(spec.device)
    if spec.precision in AUTOCAST and not device.startswith("cuda"):
        raise UsageError(
            f"RAIOX_PRECISION={spec.precision} runs on a CUDA GPU; on a CPU use fp32, "
            "or int8 on ONNX Runtime"
        )
    if spec.precision not in ("fp32", *AUTOCAST):
        raise UsageError(f"torch runs fp32, fp16 or bf16, not {spec.precision}")
    checkpoint = _checkpoint_path(spec)
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
    return TorchEmbedder(spec, model, preprocess, device, int(dim))


def _pretrained_cfg(spec: ModelSpec) -> dict[str, Any] | None:
    """A pretrained tag's preprocessing (mean, std, resize mode), as open_clip merges it."""
    if spec.weights is not None or spec.random:
        return None
    import open_clip  # start-up time

    return open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or None


def _checkpoint_path(spec: ModelSpec) -> str | None:
    """A local file with the weights, or None for random weights. Never waits on a
    network that is not there: offline, this fails in seconds with the fixes."""
    if spec.weights is not None:
        model_id(spec)  # raises when the file is missing
        return str(spec.weights)
    if spec.random:
        return None
    import open_clip  # start-up time

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
        from huggingface_hub import try_to_load_from_cache  # start-up time

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
