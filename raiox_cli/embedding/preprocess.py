"""The model's preprocessing in Pillow and numpy only: PIL image -> float32 (3, H, W).

The same numbers as open_clip's inference transform (Resize of the shortest side,
CenterCrop, RGB, ToTensor, Normalize), without torch or torchvision, so every
backend and every decode worker (threads, Ray processes, the ONNX path that never
imports torch) shares one implementation. The resize uses Pillow's reducing_gap
(PREPROCESS_VERSION 2); tests compare against open_clip's own transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# Bump when preprocessing changes in a way that changes embeddings.
# 2: large images are downscaled with Pillow's reducing_gap (and JPEGs decoded at a
# reduced DCT scale): cosine to version 1 >= 0.99999 on ViT-B-32 (bench/README.md).
PREPROCESS_VERSION = 2
# Pillow's reducing_gap for the model's resize: a box reduction to within 2x of the
# target, then the model's filter; "indistinguishable" per Pillow from 3 up, and
# measured at cosine >= 0.999998 to the exact resize at 2, for a third of the CPU
# on a 2000x1600 radiograph.
REDUCING_GAP = 2.0
# open_clip's defaults (OPENAI_DATASET_MEAN/STD) when a config names none.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values


class UnsupportedPreprocessing(ValueError):
    """A model whose transform this module does not reproduce (not shortest-side
    resize + centre crop of a square, or another filter)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model's inference transform does; stored beside an ONNX export so the
    ONNX path knows it without open_clip."""

    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(
            size=int(data["size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
        )

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        """From an open_clip model's `visual.preprocess_cfg`; refuses what open_clip
        would do differently from shortest-side resize + centre crop."""
        size = cfg.get("size", 224)
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise UnsupportedPreprocessing(f"non-square input size {size}")
            size = size[0]
        resize_mode = cfg.get("resize_mode") or "shortest"
        if resize_mode != "shortest":
            raise UnsupportedPreprocessing(f"resize_mode {resize_mode!r}")
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in RESAMPLE:
            raise UnsupportedPreprocessing(f"interpolation {interpolation!r}")
        mean = tuple(cfg.get("mean") or OPENAI_MEAN)
        std = tuple(cfg.get("std") or OPENAI_STD)
        if len(mean) != 3 or len(std) != 3:
            raise UnsupportedPreprocessing("mean and std must have three channels")
        return cls(int(size), mean, std, interpolation)  # type: ignore[arg-type]


class Preprocess:
    """PIL image ("L", "RGB" or any mode Pillow converts) -> float32 (3, size, size).
    Picklable (plain numbers inside) and thread-safe."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.size = config.size
        self.resample = RESAMPLE[config.interpolation]
        self.mean = np.asarray(config.mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(config.std, dtype=np.float32).reshape(-1, 1, 1)

    @property
    def decode_to(self) -> int:
        """The shortest side a decoder may stop at (JPEG draft): still REDUCING_GAP
        times what the resize makes of it."""
        return int(self.size * REDUCING_GAP)

    def __call__(self, image: Image.Image) -> np.ndarray:
        if image.mode not in ("L", "RGB"):
            # images.load_image gives "L" or RGB. Grey stays one channel to the end
            # (normalised per channel below): the same values as open_clip's
            # convert-to-RGB after the crop, a third of the copying.
            image = image.convert("RGB")
        image = image.resize(
            shortest_side(image.size, self.size), self.resample, reducing_gap=REDUCING_GAP
        )
        image = center_crop(image, self.size)
        pixels = np.asarray(image, dtype=np.uint8)
        if image.mode == "L":  # grey: one channel scaled, normalised per channel
            grey = pixels.astype(np.float32)
            grey /= np.float32(255)
            out = np.empty((3, *grey.shape), dtype=np.float32)
            for channel in range(3):
                np.subtract(grey, self.mean[channel], out=out[channel])
                out[channel] /= self.std[channel]
            return out
        out = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
        out /= np.float32(255)
        out -= self.mean
        out /= self.std
        return out


def shortest_side(size: tuple[int, int], target: int) -> tuple[int, int]:
    """torchvision's output size for Resize(target) of a (w, h) image."""
    width, height = size
    short, long = min(width, height), max(width, height)
    other = int(target * long / short)
    return (target, other) if width <= height else (other, target)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop of a PIL image at least `size` on both sides (Python's
    round, as torchvision uses)."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return image.crop((left, top, left + size, top + size))
