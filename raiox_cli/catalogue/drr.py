"""Digitally reconstructed radiographs of a closed triangle mesh: numpy only.

The path length of a ray through a closed surface is the sum, over the
triangles the ray crosses, of each crossing's depth signed by whether the ray
leaves (+) or enters (-) the solid there (the divergence theorem along a line).
So one pass that scan-converts every triangle and adds its signed depth plane
into the pixels it covers gives every pixel's exact path length at once: no
ray-triangle tests and no voxels. Which centres a triangle covers is decided
with exact integer edge tests on fixed-point vertices (1/65536 px), and a centre
on an edge shared by two triangles goes to exactly one of them, so a watertight
mesh leaves no seams. Each triangle is scanned across its narrower extent, along
rows or along columns: a CAD mesh's long slivers (a cylinder's side, 10 mm long
and 0.001 mm wide) cost a line or two each, not one per pixel row they span, so
a view costs about faces x their narrower extent in pixels, plus the pixels
covered. The radiograph is then Beer-Lambert attenuation, detector blur
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
    along_rows, along_columns = _spans(xy, depth, faces, size, px_per_mm)
    if source_mm is None:
        frame = np.zeros((size, size))
        _sum_parallel(along_rows, frame)
        _sum_parallel(along_columns, frame.T)  # a view: written in place
        return np.maximum(frame, 0.0, out=frame)
    frame = _sum_cone(along_rows, size) + _sum_cone(along_columns, size).T
    centre = (np.arange(size) + 0.5 - size / 2) / px_per_mm
    secant = np.sqrt(1 + (centre[:, None] ** 2 + centre[None, :] ** 2) / source_mm**2)
    return np.maximum(frame * secant, 0.0)


_Spans = tuple[np.ndarray, ...]

# Which pixel centres a triangle covers is decided in fixed point (1/65536 px in a
# frame up to 8192 px, coarser beyond), with exact integer edge tests: a centre on an
# edge belongs to the triangle it would fall in if nudged right (then down), so the two
# triangles of a shared edge split its centres exactly, whichever way each of them is
# scanned. Coordinates up to 2**29 units keep every product below 2**62.
_UNITS = 2**29
_FINEST = 2**16
# Candidate (triangle, row) pairs per batch: bounds the temporaries (~50 MB).
_BATCH = 1 << 19


def _spans(
    xy: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: int, px_per_mm: float
) -> tuple[_Spans, _Spans]:
    """Every (triangle, row) that covers pixel centres, as row, first and stop column,
    the span's ends (column) and the depth there, and the crossing's sign. A triangle
    taller than wide (in pixel centres) is scanned along columns instead: the second
    set is in the transposed frame. So a long sliver costs the few lines across it, not
    the many along it: the work is bounded by the faces times their narrower extent."""
    px = xy[:, 0] * px_per_mm + size / 2
    py = size / 2 - xy[:, 1] * px_per_mm  # rows go down
    reach = max(float(np.abs(px).max()), float(np.abs(py).max())) if len(px) else 0.0
    sub = min(_FINEST, 2 ** math.floor(math.log2(_UNITS / max(reach, size, 1.0))))
    if sub < 16:
        raise ValueError("the model projects too far outside the frame")
    fx = np.round(px * sub).astype(np.int64)
    fy = np.round(py * sub).astype(np.int64)
    corners = tuple(np.ascontiguousarray(faces.T, dtype=np.int64))
    x0, x1, x2 = (fx[c] for c in corners)
    y0, y1, y2 = (fy[c] for c in corners)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    keep = np.flatnonzero(area)  # edge-on triangles cover nothing
    sign = -np.sign(area[keep]).astype(np.float64)  # +: the ray leaves (y up in the model)
    y_low, y_high = np.minimum(np.minimum(y0, y1), y2), np.maximum(np.maximum(y0, y1), y2)
    x_low, x_high = np.minimum(np.minimum(x0, x1), x2), np.maximum(np.maximum(x0, x1), x2)
    rows, columns = _centres(y_low, y_high, size, sub), _centres(x_low, x_high, size, sub)
    across = (columns < rows)[keep]
    along, down = keep[~across], keep[across]
    return (
        _scan(fx, fy, sub, depth, tuple(c[along] for c in corners), sign[~across], size, False),
        _scan(fy, fx, sub, depth, tuple(c[down] for c in corners), sign[across], size, True),
    )


def _centres(low: np.ndarray, high: np.ndarray, size: int, sub: int) -> np.ndarray:
    """How many pixel-centre lines (fixed point, `sub` units a pixel) lie in
    [low, high], within the frame."""
    first = np.clip((low + sub // 2 - 1) // sub, 0, size)
    stop = np.clip((high + sub // 2) // sub, 0, size)
    return np.maximum(stop - first, 0)


def _scan(
    fx: np.ndarray,
    fy: np.ndarray,
    sub: int,
    z: np.ndarray,
    corners: tuple[np.ndarray, np.ndarray, np.ndarray],
    sign: np.ndarray,
    size: int,
    transposed: bool,
) -> _Spans:
    """Spans along rows of the triangles with vertex ids `corners` (y down): which
    centres by exact fixed-point tests on (fx, fy), depths by interpolation across the
    same fixed-point triangle (the float one may miss a centre the fixed-point one
    covers by a hair, and a sliver's depth changes fast across it). `transposed`: x
    and y were swapped, so ties go to the triangle below, then right."""
    half = sub // 2
    px, py = fx / sub, fy / sub
    # Corners by (row, vertex id): top, middle, bottom. Rows above the middle corner
    # lie between the long edge (top-bottom) and the upper short one, rows below it
    # between the long edge and the lower one; a row through the middle corner
    # itself (a centre exactly there) is bounded by all three.
    shift = max(1, len(fx).bit_length())  # |fy| < 2**30: the keys fit 62 bits
    keys = [(fy[c] << shift) | c for c in corners]
    for i, j in ((0, 1), (1, 2), (0, 1)):
        keys[i], keys[j] = np.minimum(keys[i], keys[j]), np.maximum(keys[i], keys[j])
    top, mid, bottom = (k & ((1 << shift) - 1) for k in keys)
    y_top, y_mid, y_bottom = (k >> shift for k in keys)
    first = np.clip((y_top + half - 1) // sub, 0, size)  # centres at or below the top
    # ... and at or above the bottom; a flat bottom's centres go to the triangle below.
    stop = np.clip((y_bottom + half - (y_mid == y_bottom)) // sub, 0, size)
    mid_first = np.clip((y_mid + half - 1) // sub, 0, size)
    mid_stop = np.clip((y_mid + half) // sub, 0, size)
    # The middle corner right of the long edge: the long edge bounds rows on the left.
    x_top, x_mid, x_bottom = fx[top], fx[mid], fx[bottom]
    long_left = (x_mid - x_top) * (y_bottom - y_top) - (y_mid - y_top) * (x_bottom - x_top) > 0
    long_edge = _edge(x_top, y_top, x_bottom, y_bottom, top, bottom, sub, transposed)
    upper = _edge(x_top, y_top, x_mid, y_mid, top, mid, sub, transposed)
    lower = _edge(x_mid, y_mid, x_bottom, y_bottom, mid, bottom, sub, transposed)
    flat_top = y_top == y_mid  # no rows above the middle corner; bounds none through it
    # Parts: rows, their short edges (two: the tighter bound holds), sparse (few rows).
    parts = [
        (first, np.minimum(mid_first, stop), lambda b: [upper], False),
        (np.maximum(first, mid_stop), stop, lambda b: [lower], False),
        (
            np.maximum(first, mid_first),
            np.minimum(mid_stop, stop),
            lambda b: [np.where(flat_top[b], lower[:, b], upper[:, b]), lower[:, b]],
            True,
        ),
    ]
    out: list[_Spans] = []
    for row_first, row_stop, shorts, sparse in parts:
        count = np.maximum(row_stop - row_first, 0)
        busy = np.flatnonzero(count) if sparse else np.arange(len(count))
        if len(busy) == 0 or not count.any():
            continue
        edge, on_left = long_edge, long_left
        if sparse:
            count, row_first, on_left, edge = (
                count[busy],
                row_first[busy],
                on_left[busy],
                edge[:, busy],
            )
        lefts, rights = [], []
        for other in shorts(busy):
            lefts.append(np.where(on_left, edge, other))
            rights.append(np.where(on_left, other, edge))
        # Depths between the long edge and the lower short one (the middle corner's
        # row: the two short edges meet there).
        depth_left, depth_right = lefts[-1][3:], rights[-1][3:]
        ends = np.cumsum(count)
        cut = np.searchsorted(ends, np.arange(_BATCH, int(ends[-1]), _BATCH))
        for lo_t, hi_t in zip(np.r_[0, cut], np.r_[cut, len(busy)], strict=True):
            if hi_t <= lo_t:
                continue
            n = count[lo_t:hi_t]
            row = np.repeat(row_first[lo_t:hi_t] - (np.cumsum(n) - n), n)
            row += np.arange(len(row))
            yc = (2 * row + 1) * half
            col0 = col1 = None
            for left, right in zip(lefts, rights, strict=True):
                p, q, r = left[:3, lo_t:hi_t].repeat(n, axis=1)
                c0 = np.clip((p * yc + q) // r, 0, size)
                p, q, r = right[:3, lo_t:hi_t].repeat(n, axis=1)
                c1 = np.clip((p * yc + q) // r, 0, size)
                col0 = c0 if col0 is None else np.maximum(col0, c0)
                col1 = c1 if col1 is None else np.minimum(col1, c1)
            hit = col1 > col0
            local = np.repeat(np.arange(lo_t, hi_t), n)[hit]
            row, col0, col1 = row[hit], col0[hit], col1[hit]
            centre = row + 0.5
            xl, zl = _along(px, py, z, *depth_left[:, local], centre)
            xr, zr = _along(px, py, z, *depth_right[:, local], centre)
            out.append((row, col0, col1, xl, xr, zl, zr, sign[busy[local]]))
    if not out:
        empty = np.zeros(0)
        return (empty.astype(np.int64),) * 3 + (empty,) * 5
    if len(out) == 1:
        return out[0]
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def _edge(
    xu: np.ndarray,
    yu: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    sub: int,
    transposed: bool,
) -> np.ndarray:
    """The edges u->v (u above v) as bounds on the columns c of the centres
    X = (2c + 1) sub/2 in a row at Y: c >= floor((P Y + Q) / R) when an edge bounds the
    row on the left, c < floor((P Y + Q) / R) on the right, with the rounding of a
    centre exactly on the edge set by the tie rule (normal frame: the centre goes
    right; transposed: down, which is right unless the edge runs down-right).
    Rows P, Q, R, u, v. A flat edge gets R = 1: it bounds no row that uses it."""
    rise, run = yv - yu, xv - xu
    tie = (run > 0) if transposed else 0
    q = xu * rise - yu * run + (sub // 2) * rise - 1 + tie
    return np.stack([run, q, np.maximum(sub * rise, 1), u, v])


def _sum_parallel(spans: _Spans, frame: np.ndarray) -> None:
    """Signed depths added into `frame` per pixel with running sums: linear along each
    span. Not clipped: a part of the mesh may sum below zero."""
    row, col0, col1, xl, xr, zl, zr, s = spans
    # Depth along the row: z = slope * col + offset, added from col0 on, removed at col1.
    # A span narrower than a pixel covers one centre: its depth there, no slope (a
    # sliver's slope would be huge and cost the running sums their precision).
    wide = (xr - xl) >= 1.0
    slope = np.where(wide, (zr - zl) / np.where(wide, xr - xl, 1.0), 0.0)
    at = np.clip((col0 + 0.5 - xl) / np.maximum(xr - xl, 1e-300), 0.0, 1.0)
    offset = np.where(wide, zl + (0.5 - xl) * slope, zl + at * (zr - zl))
    # Running sums only over the mesh's own box of the frame: most of it is empty.
    if len(row) == 0:
        return
    r0, r1 = int(row.min()), int(row.max()) + 1
    c0, c1 = int(col0.min()), int(col1.max())
    height, width = r1 - r0, c1 - c0 + 1
    index = np.concatenate([(row - r0) * width + col0 - c0, (row - r0) * width + col1 - c0])
    n = height * width
    slopes = np.bincount(index, np.concatenate([s * slope, -s * slope]), n)
    offsets = np.bincount(index, np.concatenate([s * offset, -s * offset]), n)
    slopes = np.cumsum(slopes.reshape(height, width), axis=1)[:, :-1]
    offsets = np.cumsum(offsets.reshape(height, width), axis=1)[:, :-1]
    frame[r0:r1, c0:c1] += slopes * np.arange(c0, c1) + offsets


def _sum_cone(spans: _Spans, size: int) -> np.ndarray:
    """Cone beam: 1/distance is what is linear along a span, so each covered pixel gets
    its crossing's distance from the source (no running sums); the sum along the
    slanted ray is this difference of distances along the central one times its secant
    (path_lengths). Not clipped."""
    row, col0, col1, xl, xr, zl, zr, s = spans
    count = col1 - col0
    which = np.repeat(np.arange(len(row)), count)
    col = col0[which] + np.arange(len(which)) - (np.cumsum(count) - count)[which]
    at = np.clip((col + 0.5 - xl[which]) / np.maximum(xr - xl, 1e-300)[which], 0.0, 1.0)
    inverse = zl[which] + at * (zr - zl)[which]
    frame = np.bincount(row[which] * size + col, -s[which] / inverse, size * size)
    return frame.reshape(size, size)


def _along(
    px: np.ndarray, py: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray, yc: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """x and depth where the edge a->b (a above b) crosses row centre yc (held to the
    edge: fixed point may take a centre a hair past a corner)."""
    dy = py[b] - py[a]
    t = np.clip((yc - py[a]) / np.where(dy == 0, 1.0, dy), 0.0, 1.0)
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
