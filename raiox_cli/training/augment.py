"""Radiograph augmentations: what real X-rays do to an implant, applied to a
reference image so a model learns to see past it.

Rotation, scale and shift (film placement), mirror and upside-down (left/right
side, upper jaw), partial crops, a neighbouring tooth and a crown beside and on
the implant, blur, gamma and contrast (exposure), noise and JPEG re-compression.
Every random choice comes from the `numpy.random.Generator` passed in: the same
generator state gives the same pixels. Images are grey ("L") PIL images; colour
input is converted. Used by `raiox adapt` and the benchmarks; `synth` keeps
drawing implants.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Augmentation:
    """How strong each transformation is. Blur radii and shifts are fractions of the
    image size, so the same settings fit any working resolution."""

    max_rotation_deg: float = 25.0
    scale: tuple[float, float] = (0.8, 1.2)
    max_shift: float = 0.08  # of width and height
    p_crop: float = 0.5
    crop: tuple[float, float] = (0.7, 0.95)  # kept fraction of each side
    p_neighbours: float = 0.6
    p_crown: float = 0.7  # given neighbours: a crown on the implant itself
    blur: tuple[float, float] = (0.001, 0.0065)  # Gaussian radius, fraction of the height
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.8, 1.2)
    noise: tuple[float, float] = (0.01, 0.05)  # standard deviation, fraction of full scale
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)
    p_upside_down: float = 0.4
    p_mirror: float = 0.5
    root_width: tuple[float, float] = (0.35, 0.55)  # a neighbour's root, of the implant's width
    p_texture: float = 0.0  # a fresh bone density and grain over the film (XRAY)
    texture: tuple[float, float] = (0.08, 0.16)  # grain strength, fraction of full scale


DEFAULT = Augmentation()
NONE = Augmentation(
    max_rotation_deg=0.0,
    scale=(1.0, 1.0),
    max_shift=0.0,
    p_crop=0.0,
    p_neighbours=0.0,
    blur=(0.0, 0.0),
    gamma=(1.0, 1.0),
    contrast=(1.0, 1.0),
    noise=(0.0, 0.0),
    p_jpeg=0.0,
    p_upside_down=0.0,
    p_mirror=0.0,
)


# Closer to the X-ray-like queries of training/synth.py (and to real films): a fresh
# bone texture over the catalogue picture's own clean one (which is otherwise the same
# in every view of that picture: a cue a model may learn instead of the implant),
# neighbouring roots as wide as real ones (5-7 mm beside a 4 mm implant), a neighbour
# more often, and up to synth's blur. `raiox adapt --augment xray`.
XRAY = Augmentation(
    p_neighbours=0.85,
    root_width=(0.6, 0.9),
    blur=(0.0015, 0.009),
    p_texture=0.8,
)
PRESETS = {"radiograph": DEFAULT, "xray": XRAY}


def augment(
    image: Image.Image, rng: np.random.Generator, aug: Augmentation = DEFAULT
) -> Image.Image:
    """One random radiograph-like variant of `image` (grey, same size)."""
    img = image if image.mode == "L" else image.convert("L")
    if rng.random() < aug.p_neighbours:
        img = neighbours(img, rng, crown=rng.random() < aug.p_crown, root_width=aug.root_width)
    img = placement(img, rng, aug)
    if aug.p_texture and rng.random() < aug.p_texture:  # drawn only when asked: DEFAULT's
        img = texture(img, rng, float(rng.uniform(*aug.texture)))  # pixels stay as they were
    if rng.random() < aug.p_crop:
        img = partial_crop(img, rng, aug.crop)
    img = exposure(img, rng, aug)
    if rng.random() < aug.p_jpeg:
        img = jpeg(img, int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1)))
    if rng.random() < aug.p_upside_down:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rng.random() < aug.p_mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _background(img: Image.Image) -> int:
    """The border's median grey: what lies outside a rotated or shifted film."""
    a = np.asarray(img)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return int(np.median(border))


def placement(img: Image.Image, rng: np.random.Generator, aug: Augmentation) -> Image.Image:
    """Rotate, scale and shift about the centre in one resampling."""
    angle = math.radians(float(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg)))
    scale = float(rng.uniform(*aug.scale))
    w, h = img.size
    dx, dy = rng.uniform(-aug.max_shift, aug.max_shift, size=2) * (w, h)
    if angle == 0 and scale == 1 and dx == 0 and dy == 0:
        return img
    # PIL maps output pixels to input pixels: the inverse of rotate-scale-shift.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    cx, cy = w / 2, h / 2
    ox, oy = cx + dx, cy + dy
    coeffs = (cos, -sin, cx - cos * ox + sin * oy, sin, cos, cy - sin * ox - cos * oy)
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        coeffs,
        Image.Resampling.BILINEAR,
        fillcolor=_background(img),
    )


def partial_crop(
    img: Image.Image, rng: np.random.Generator, kept: tuple[float, float]
) -> Image.Image:
    """Keep a random part of the image (the film missed the rest), scaled back up."""
    w, h = img.size
    fx, fy = rng.uniform(*kept, size=2)
    cw, ch = max(1, int(w * fx)), max(1, int(h * fy))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize(img.size, Image.Resampling.BILINEAR)


def exposure(img: Image.Image, rng: np.random.Generator, aug: Augmentation) -> Image.Image:
    """Blur, gamma, contrast and sensor noise."""
    radius = float(rng.uniform(*aug.blur)) * img.size[1]
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    gamma = float(rng.uniform(*aug.gamma))
    contrast = float(rng.uniform(*aug.contrast))
    sigma = float(rng.uniform(*aug.noise))
    if gamma == 1 and contrast == 1 and sigma == 0:
        return img
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (pixels**gamma - 0.5) * contrast + 0.5
    if sigma > 0:
        pixels = pixels + rng.normal(0, sigma, pixels.shape).astype(np.float32)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-compress as JPEG (what e-mailed and form-uploaded X-rays went through)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("L")


def _bright_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of the radiopaque object (the implant): the brightest pixels."""
    a = np.asarray(img)
    if float(a.std()) < 4:  # a flat picture: nothing stands out
        return None
    threshold = max(float(np.percentile(a, 97)), float(a.mean()) + 2 * float(a.std()))
    ys, xs = np.nonzero(a >= threshold)
    if len(xs) < 8 or len(xs) > 0.5 * a.size:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def texture(img: Image.Image, rng: np.random.Generator, grain: float) -> Image.Image:
    """A fresh bone texture over the picture: a smooth large-scale density (as
    training/synth.py draws bone) and a trabecular grain of strength `grain`."""
    width, height = img.size
    coarse = rng.random((max(2, height // 48), max(2, width // 48)), dtype=np.float32)
    fine = rng.random((max(2, height // 5), max(2, width // 5)), dtype=np.float32)
    coarse_img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        img.size, Image.Resampling.BICUBIC
    )
    fine_img = Image.fromarray((fine * 255).astype(np.uint8)).resize(
        img.size, Image.Resampling.BILINEAR
    )
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels + 0.22 * (np.asarray(coarse_img, dtype=np.float32) - 128)
    pixels = pixels + grain * (np.asarray(fine_img, dtype=np.float32) - 128)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def neighbours(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    crown: bool,
    root_width: tuple[float, float] = DEFAULT.root_width,
) -> Image.Image:
    """A neighbouring tooth (root and crown) beside the implant and, with `crown`, a
    bright prosthetic crown on top of it. The implant is found as the brightest
    object; without one the image is returned unchanged. `root_width`: the root's
    half-width range, as a fraction of the implant's width."""
    box = _bright_box(img)
    if box is None:
        return img
    x0, y0, x1, y1 = box
    width, height = max(1, x1 - x0), max(1, y1 - y0)
    out = img.copy()
    draw = ImageDraw.Draw(out)
    cx = (x0 + x1) / 2
    side = 1 if rng.random() < 0.5 else -1
    tx = cx + side * width * float(rng.uniform(1.1, 1.8))
    root_w = width * float(rng.uniform(*root_width))
    shade = int(rng.integers(120, 160))
    draw.polygon(
        [
            (tx - root_w, y0),
            (tx + root_w, y0),
            (tx + root_w * 0.3, y0 + height * 1.05),
            (tx - root_w * 0.3, y0 + height * 1.05),
        ],
        fill=shade,
    )
    crown_h = height * float(rng.uniform(0.45, 0.7))
    draw.ellipse(
        (tx - root_w * 1.4, y0 - crown_h, tx + root_w * 1.4, y0 + 2), fill=min(255, shade + 40)
    )
    if crown:
        crown_w = width * float(rng.uniform(0.4, 0.55))
        draw.rounded_rectangle(
            (cx - crown_w, y0 - crown_h, cx + crown_w, y0 - 1),
            radius=crown_w / 3,
            fill=int(rng.integers(225, 250)),
        )
    return out


__all__ = [
    "DEFAULT",
    "NONE",
    "PRESETS",
    "XRAY",
    "Augmentation",
    "augment",
    "exposure",
    "jpeg",
    "neighbours",
    "partial_crop",
    "placement",
    "texture",
]
