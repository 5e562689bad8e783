"""Digitally reconstructed radiographs of a closed triangle mesh: numpy only.

The path length of a ray through a closed surface is the sum, over the
triangles the ray crosses, of each crossing's depth signed by whether the ray
leaves (+) or enters (-) the solid there (the divergence theorem along a line).
So one pass that scan-converts every triangle and adds its signed depth plane
into the pixels it covers gives every pixel's exact path length at once: no
ray-triangle tests and no voxels. Pixel centres on an edge shared by two
triangles go to exactly one of them (half-open rows and columns, each edge's
crossing computed from its endpoints in one fixed order), so a watertight mesh
leaves no seams. The radiograph is then Beer-Lambert attenuation, detector blur
and quantum noise from a seeded generator, over a plain or bone-like background.
Parallel rays by default; a cone beam (point source) projects the vertices first
and sums distances from the source per pixel instead of with running sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Effective linear attenuation coefficients (1/mm) in a typical intraoral beam
# (60-70 kVp, about 35 keV effective), from NIST XCOM mass attenuation x density:
# titanium ~3.3 cm2/g x 4.5 g/cm3; zirconia (ZrO2) ~8.5 cm2/g x 6.05 g/cm3.
MATERIALS: dict[str, float] = {"titanium": 1.5, "zirconia": 5.1}
BACKGROUNDS = ("plain", "bone")
# Display window: attenuation (line integral) shown white. Fixed, not per material,
# so zirconia shows as the near-silhouette it is and titanium keeps its inner socket.
WHITE_AT = 8.0
GAMMA = 0.6


@dataclass(frozen=True)
class Physics:
    """How a path-length map becomes a radiograph."""

    material: str = "titanium"
    background: str = "plain"
    blur_mm: float = 0.05  # detector point-spread (Gaussian sigma)
    photons: float = 1e5  # per pixel, unattenuated: quantum noise; 0 turns noise off

    @property
    def mu(self) -> float:
        return MATERIALS[self.material]


def rotation(axis_deg: float, tilt_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """Model frame (long axis = +y, platform up) -> camera frame (x right, y up,
    z toward the viewer): turn about the long axis, tilt the top toward the viewer,
    then roll in the image plane (counter-clockwise)."""
    a, t, r = (math.radians(v) for v in (axis_deg, tilt_deg, roll_deg))
    turn = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    tilt = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    roll = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return roll @ tilt @ turn


def path_lengths(
    vertices: np.ndarray,
    faces: np.ndarray,
    size: int,
    px_per_mm: float,
    source_mm: float | None = None,
) -> np.ndarray:
    """(size, size) path length in mm through the closed mesh `vertices` (camera frame,
    mm, centred on the origin), sampled at pixel centres: along parallel rays (camera
    z), or with `source_mm` from a point source that far in front of the centre (a
    cone beam, magnification 1 at the centre's plane)."""
    if source_mm is None:
        xy, depth = vertices[:, :2], vertices[:, 2]
    else:
        distance = source_mm - vertices[:, 2]
        if (distance <= 0).any():
            raise ValueError(f"a source {source_mm:g} mm away is inside the model")
        xy = vertices[:, :2] * (source_mm / distance)[:, None]
        depth = 1 / distance  # affine across a projected triangle, unlike the distance
    spans = _spans(xy, depth, faces, size, px_per_mm)
    if source_mm is None:
        return _sum_parallel(spans, size)
    return _sum_cone(spans, size, px_per_mm, source_mm)


_Spans = tuple[np.ndarray, ...]


def _spans(
    xy: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: int, px_per_mm: float
) -> _Spans:
    """Every (triangle, row) that covers pixel centres: row, first and stop column,
    the span's ends (column) and the depth there, and the crossing's sign."""
    px = xy[:, 0] * px_per_mm + size / 2
    py = size / 2 - xy[:, 1] * px_per_mm  # rows go down
    z = depth
    tri = faces.astype(np.int64)
    ax, ay = xy[tri[:, 0], 0], xy[tri[:, 0], 1]
    cross = (xy[tri[:, 1], 0] - ax) * (xy[tri[:, 2], 1] - ay) - (xy[tri[:, 2], 0] - ax) * (
        xy[tri[:, 1], 1] - ay
    )
    keep = cross != 0  # edge-on triangles cover nothing
    tri, sign = tri[keep], np.sign(cross[keep])
    # Each triangle's corners by (row, vertex index): a shared edge is always walked
    # from the same end, so both its triangles compute bitwise the same crossings.
    order = np.lexsort((tri, py[tri]), axis=-1)
    tri = np.take_along_axis(tri, order, axis=1)
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    first = np.clip(np.ceil(py[v0] - 0.5), 0, size).astype(np.int64)
    stop = np.clip(np.ceil(py[v2] - 0.5), 0, size).astype(np.int64)
    rows = np.maximum(stop - first, 0)
    which = np.repeat(np.arange(len(tri)), rows)
    starts = np.cumsum(rows) - rows
    row = first[which] + np.arange(len(which)) - starts[which]
    yc = row + 0.5
    a, b, c = v0[which], v1[which], v2[which]
    lower = yc >= py[b]
    s0, s1 = np.where(lower, b, a), np.where(lower, c, b)
    x_long, z_long = _along(px, py, z, a, c, yc)
    x_short, z_short = _along(px, py, z, s0, s1, yc)
    left = x_long <= x_short
    xl, xr = np.where(left, x_long, x_short), np.where(left, x_short, x_long)
    zl, zr = np.where(left, z_long, z_short), np.where(left, z_short, z_long)
    col0 = np.clip(np.ceil(xl - 0.5), 0, size).astype(np.int64)
    col1 = np.clip(np.ceil(xr - 0.5), 0, size).astype(np.int64)
    hit = col1 > col0
    return (row[hit], col0[hit], col1[hit], xl[hit], xr[hit], zl[hit], zr[hit], sign[which[hit]])


def _sum_parallel(spans: _Spans, size: int) -> np.ndarray:
    """Signed depths summed per pixel with running sums: linear along each span."""
    row, col0, col1, xl, xr, zl, zr, s = spans
    # Depth along the row: z = slope * col + offset, added from col0 on, removed at col1.
    # A span narrower than a pixel covers one centre: its depth there, no slope (a
    # sliver's slope would be huge and cost the running sums their precision).
    wide = (xr - xl) >= 1.0
    slope = np.where(wide, (zr - zl) / np.where(wide, xr - xl, 1.0), 0.0)
    at = np.clip((col0 + 0.5 - xl) / np.maximum(xr - xl, 1e-300), 0.0, 1.0)
    offset = np.where(wide, zl + (0.5 - xl) * slope, zl + at * (zr - zl))
    # Running sums only over the mesh's own box of the frame: most of it is empty.
    frame = np.zeros((size, size))
    if len(row) == 0:
        return frame
    r0, r1 = int(row.min()), int(row.max()) + 1
    c0, c1 = int(col0.min()), int(col1.max())
    height, width = r1 - r0, c1 - c0 + 1
    index = np.concatenate([(row - r0) * width + col0 - c0, (row - r0) * width + col1 - c0])
    n = height * width
    slopes = np.bincount(index, np.concatenate([s * slope, -s * slope]), n)
    offsets = np.bincount(index, np.concatenate([s * offset, -s * offset]), n)
    slopes = np.cumsum(slopes.reshape(height, width), axis=1)[:, :-1]
    offsets = np.cumsum(offsets.reshape(height, width), axis=1)[:, :-1]
    frame[r0:r1, c0:c1] = np.maximum(slopes * np.arange(c0, c1) + offsets, 0.0)
    return frame


def _sum_cone(spans: _Spans, size: int, px_per_mm: float, source_mm: float) -> np.ndarray:
    """Cone beam: 1/distance is what is linear along a span, so each covered pixel gets
    its crossing's distance from the source (no running sums), and the sum along the
    slanted ray is the difference of distances along the central one times its secant."""
    row, col0, col1, xl, xr, zl, zr, s = spans
    count = col1 - col0
    which = np.repeat(np.arange(len(row)), count)
    col = col0[which] + np.arange(len(which)) - (np.cumsum(count) - count)[which]
    at = np.clip((col + 0.5 - xl[which]) / (xr - xl)[which], 0.0, 1.0)
    inverse = zl[which] + at * (zr - zl)[which]
    frame = np.bincount(row[which] * size + col, -s[which] / inverse, size * size)
    centre = (np.arange(size) + 0.5 - size / 2) / px_per_mm
    secant = np.sqrt(1 + (centre[:, None] ** 2 + centre[None, :] ** 2) / source_mm**2)
    return np.maximum(frame.reshape(size, size) * secant, 0.0)


def _along(
    px: np.ndarray, py: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray, yc: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """x and depth where the edge a->b (a above b) crosses row centre yc."""
    dy = py[b] - py[a]
    t = (yc - py[a]) / np.where(dy == 0, 1.0, dy)
    return px[a] + t * (px[b] - px[a]), z[a] + t * (z[b] - z[a])


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box average: `factor` x `factor` samples per output pixel (anti-aliasing)."""
    if factor == 1:
        return image
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur, edges extended."""
    if sigma_px <= 0.05:
        return image
    radius = max(1, math.ceil(3 * sigma_px))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if i == axis else (0, 0) for i in (0, 1)], "edge")
        n = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return image


def background(kind: str, size: int, px_per_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Attenuation (line integral) of what lies around the implant: soft tissue only,
    or bone: smooth density, trabecular grain and a denser crest lower down."""
    if kind == "plain":
        return np.full((size, size), 0.6)
    coarse = _noise_field(rng, size, max(2, round(size / (3.0 * px_per_mm))))
    grain = _noise_field(rng, size, max(2, round(size / (0.35 * px_per_mm))))
    ramp = np.linspace(-0.25, 0.35, size)[:, None]
    return 1.1 + 0.35 * coarse + 0.18 * grain + ramp


def _noise_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: random values on a `cells` grid, bilinearly enlarged."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    at = np.linspace(0, cells, size, endpoint=False)
    i = at.astype(np.int64)
    f = at - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def radiograph(
    lengths: np.ndarray,
    physics: Physics,
    px_per_mm: float,
    rng: np.random.Generator,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """8-bit radiograph (bright = attenuating) of a path-length map (mm): Beer-Lambert
    through the material over the background (plus `extra` attenuation: neighbouring
    structures), blurred on the detector, with quantum noise, log-displayed."""
    size = lengths.shape[0]
    attenuation = physics.mu * lengths + background(physics.background, size, px_per_mm, rng)
    if extra is not None:
        attenuation = attenuation + extra
    exposure = gaussian_blur(np.exp(-attenuation), physics.blur_mm * px_per_mm)
    if physics.photons > 0:
        counts = physics.photons * exposure
        counts = counts + np.sqrt(counts) * rng.standard_normal(counts.shape)
        exposure = np.maximum(counts, 0.5) / physics.photons
    shown = np.clip(-np.log(exposure) / WHITE_AT, 0, 1) ** GAMMA
    return np.round(shown * 255).astype(np.uint8)


__all__ = [
    "BACKGROUNDS",
    "MATERIALS",
    "Physics",
    "background",
    "downsample",
    "gaussian_blur",
    "path_lengths",
    "radiograph",
    "rotation",
]
