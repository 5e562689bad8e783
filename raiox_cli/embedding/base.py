"""What every backend shares: the model's description (ModelSpec), its id, and the
Embedding base class (immich-ml's pattern: one base, one module per runtime).

Nothing here imports torch or onnxruntime: the runtimes (torch.py, onnx.py) build
on this module, and embedding/__init__ only chooses between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli import images
from raiox_cli.config import Settings
from raiox_cli.embedding import checkpoints
from raiox_cli.errors import ModelUnavailable

if TYPE_CHECKING:
    from PIL import Image

    from raiox_cli.images import Crop

log = logging.getLogger(__name__)

# Called after every forward pass with (images, seconds): the server's metrics listen.
forward_observers: list[Callable[[int, float], None]] = []


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
    # config.PRECISIONS; "auto" is made concrete by the chooser (embedding.resolve).
    precision: str = "fp32"

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        return cls(
            settings.model,
            settings.pretrained,
            settings.weights,
            settings.device,
            settings.backend,
            settings.home,
            settings.precision,
        )

    @property
    def random(self) -> bool:
        return self.weights is None and self.pretrained.lower() in {"none", "random", ""}


def weights_file(spec: ModelSpec) -> tuple[str, str] | None:
    """(absolute path, sha256) of the local weights file spec loads, if it loads one:
    what the catalogue records to follow it when nothing else is configured."""
    if spec.weights is None:
        return None
    return str(spec.weights.resolve()), checkpoints.file_sha256(spec.weights)


# The model id's suffix for a precision whose vectors differ from fp32's enough to
# matter: int8's (mean cosine to fp32 ~0.99) do. fp16/bf16 autocast's do not (cosine
# >= 0.999 to fp32), and a catalogue built on a GPU must stay searchable on a CPU,
# so they share fp32's id.
PRECISION_SUFFIX = {"int8": "@int8"}


def model_id(spec: ModelSpec) -> str:
    """The id recorded with every embedding; computed without loading the model.
    spec.precision must be concrete (not "auto")."""
    if spec.precision == "auto":
        raise ValueError("model_id needs a concrete precision: resolve the spec first")
    suffix = PRECISION_SUFFIX.get(spec.precision, "")
    if spec.weights is not None:
        if not spec.weights.is_file():
            raise ModelUnavailable(f"RAIOX_WEIGHTS file {spec.weights} does not exist")
        return f"{spec.name}:file:{checkpoints.file_sha256(spec.weights)[:16]}{suffix}"
    if spec.random:
        return f"{spec.name}:none{suffix}"
    return f"{spec.name}:{spec.pretrained}{suffix}"


@dataclass(frozen=True)
class ParsedModelId:
    name: str
    tag: str  # the pretrained tag, "none", or "file:<sha256 prefix>"
    precision: str  # "fp32" for every precision that shares fp32's id

    @property
    def from_file(self) -> bool:
        return self.tag.startswith("file:")


def parse_model_id(model_id: str) -> ParsedModelId:
    """A recorded model id back into its parts (the inverse of model_id)."""
    name, _, tag = model_id.partition(":")
    for precision, suffix in PRECISION_SUFFIX.items():
        if tag.endswith(suffix):
            return ParsedModelId(name, tag[: -len(suffix)], precision)
    return ParsedModelId(name, tag, "fp32")


_warned_random: set[str] = set()


def warn_if_random(spec: ModelSpec) -> None:
    """Say loudly, once per command and model (load_embedder calls it, however often
    a command asks for the model and whichever runtime loads it), that random weights
    make meaningless results."""
    if spec.random and spec.name not in _warned_random:
        _warned_random.add(spec.name)
        log.warning(
            "MODEL HAS RANDOM WEIGHTS (--pretrained none): embeddings are only good for "
            "speed tests and smoke runs; search results are meaningless"
        )


def forget_warnings() -> None:
    """A new command in this process (a test's CliRunner) says it again."""
    _warned_random.clear()


def observed(images: int, seconds: float) -> None:
    """Tell the forward pass's observers (the server's metrics) about one pass."""
    for observe in forward_observers:
        observe(images, seconds)


class Embedding:
    """A loaded model with its preprocessing, whatever runs it. Each backend sets
    spec, model_id, dim, device, preprocess_version and preprocessor, and defines
    embed_tensors (numpy in, unit float32 vectors out). Thread-safe."""

    backend: str
    spec: ModelSpec
    model_id: str
    dim: int
    device: str
    preprocess_version: int
    preprocessor: Callable[[Image.Image], np.ndarray]

    def embed_tensors(self, pixels: Any) -> np.ndarray:
        """A batch (N, 3, H, W) of preprocessed images -> (N, dim) unit float32 vectors."""
        raise NotImplementedError

    def preprocess(self, image: Image.Image) -> Any:
        """Grey ("L") or RGB PIL image -> the model's input array. Thread-safe."""
        return self.preprocessor(image)

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


@dataclass(frozen=True)
class EmbeddedFile:
    path: str
    vector: np.ndarray


@dataclass(frozen=True)
class FailedFile:
    path: str
    reason: str


def embed_files(
    embedder: Embedding,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    crop: Crop | None = None,
) -> tuple[list[EmbeddedFile], list[FailedFile]]:
    """Decode (through images.load_image) and embed files; bad files are reported,
    never fatal. Decoding is chunked so memory stays bounded for long lists."""
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
