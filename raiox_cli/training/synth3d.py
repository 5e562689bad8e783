"""synth.py's parametric implants as watertight 3D meshes, and their renders.

A design's outline (body, taper, thread pitch/depth/profile, apex, collar) is
revolved about its axis with the thread advanced along a helix, and its connection
(hexagonal, conical or tri-lobed socket, then the screw channel; an external hex on
top) is cut as an inner surface: one closed loop of rings, so the mesh is watertight
by construction. The same implant can then be drawn three ways: synth's 2D view, a
clean render (catalogue), and a noisy tilted render with neighbouring teeth (query).
Platform up: the axis is +z, the platform at z = 0, the apex at z = -length.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from raiox_cli.catalogue import drr, render
from raiox_cli.training import synth
from raiox_cli.training.synth import ImplantDesign

EXTERNAL_HEX_MM = 0.7  # height of the external hex above the platform
THREAD_SAMPLES = 24  # rings per thread pitch: enough for a square thread's flanks


def _socket_shape(connection: str, theta: np.ndarray) -> np.ndarray:
    """Cross-section of the connection socket: radius factor by angle (1 = round)."""
    if connection in ("internal hex", "external hex"):
        # A hexagon of apothem 1: distance to its side at each angle.
        return 1 / np.cos(np.mod(theta + math.pi / 6, math.pi / 3) - math.pi / 6)
    if connection == "tri-channel":
        return 1 + 0.15 * np.cos(3 * theta)
    return np.ones_like(theta)


def _rings_to_mesh(
    rings: list[np.ndarray], caps: tuple[np.ndarray | None, np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Quads between consecutive rings (each (n, 3), same n), closed by a fan to each
    cap point, or, with no caps, the last ring joined back to the first (a torus-like
    loop). Orientation is fixed afterwards by the volume's sign."""
    n = len(rings[0])
    vertices = list(rings)
    k = np.arange(n)
    faces = []
    count = len(rings)
    pairs = [(i, i + 1) for i in range(count - 1)]
    if caps[0] is None and caps[1] is None:
        pairs.append((count - 1, 0))
    for i, j in pairs:
        a, b = i * n + k, i * n + (k + 1) % n
        c, d = j * n + (k + 1) % n, j * n + k
        faces += [np.stack([a, b, c], 1), np.stack([a, c, d], 1)]
    base = count * n
    for end, cap in zip((0, count - 1), caps, strict=True):
        if cap is None:
            continue
        vertices.append(cap[None, :])
        ring = end * n
        fan = np.stack([np.full(n, base), ring + (k + 1) % n, ring + k], 1)
        faces.append(fan if end == 0 else fan[:, ::-1])  # the last ring is walked backwards
        base += 1
    v = np.concatenate(vertices).astype(np.float64)
    f = np.concatenate(faces).astype(np.int64)
    if _volume(v, f) < 0:
        f = f[:, ::-1]
    return v, f


def _volume(v: np.ndarray, f: np.ndarray) -> float:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6)


def _ring(radius: np.ndarray, theta: np.ndarray, z: float) -> np.ndarray:
    return np.stack([radius * np.cos(theta), radius * np.sin(theta), np.full_like(theta, z)], 1)


def implant_mesh(
    d: ImplantDesign, *, around: int = 96, detail: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, faces) of the implant, watertight, in mm, platform at z = 0."""
    theta = np.arange(around) * 2 * math.pi / around
    turn = theta / (2 * math.pi)
    step = d.thread_pitch_mm / max(4, round(THREAD_SAMPLES * detail))
    depths = np.linspace(0, d.length_mm, max(8, math.ceil(d.length_mm / step)) + 1)
    outer = [
        _ring(np.maximum(synth._half_width(d, np.full(around, y), turn), 0.05), theta, -y)
        for y in depths
    ]
    socket = synth._socket_half_width(d, depths)
    inner_depths = depths[socket > 0]
    shape = _socket_shape(d.connection, theta)
    inner = []
    for y, ring in zip(inner_depths, outer, strict=False):
        width = float(synth._socket_half_width(d, np.array([y]))[0])
        round_ = width < 0.15 * d.diameter_mm  # the screw channel is round
        # Keep a wall: the socket never comes closer than 80% of the thread's root.
        root = float(np.hypot(ring[:, 0], ring[:, 1]).min())
        inner.append(_ring(np.minimum(width * (1 if round_ else shape), 0.8 * root), theta, -y))
    # One loop: socket floor (cap) -> socket wall up -> [external hex] -> platform ->
    # outer wall down -> apex (cap).
    rings = [*inner[::-1], *_external_hex(d, theta), *outer]
    floor = np.array([0.0, 0.0, -float(inner_depths[-1])])
    apex = np.array([0.0, 0.0, -d.length_mm])
    return _rings_to_mesh(rings, (floor, apex))


def _external_hex(d: ImplantDesign, theta: np.ndarray) -> list[np.ndarray]:
    """An external hex's rings, continuing the screw channel up through it: channel at
    its top, hexagon at its top, hexagon on the platform. None for other connections."""
    if d.connection != "external hex":
        return []
    channel = float(synth._socket_half_width(d, np.array([0.0]))[0])
    hexagon = 0.3 * d.diameter_mm * _socket_shape("external hex", theta)
    top = EXTERNAL_HEX_MM
    return [
        _ring(np.full_like(theta, channel), theta, top),
        _ring(hexagon, theta, top),
        _ring(hexagon, theta, 0.0),
    ]


def write_models(out: Path, designs: list[ImplantDesign], **mesh_options: float) -> list[Path]:
    """One binary STL per design plus `catalogue.csv` (a `model` column) beside them:
    the input `raiox render` reads."""
    import trimesh

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, d in enumerate(designs):
        vertices, faces = implant_mesh(d, **mesh_options)  # type: ignore[arg-type]
        path = out / f"implant_{index:03d}.stl"
        trimesh.Trimesh(vertices, faces, process=False).export(path)
        paths.append(path)
    with (out / "catalogue.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["model", *synth.CSV_COLUMNS])
        for path, d in zip(paths, designs, strict=True):
            writer.writerow(
                [
                    path.name,
                    d.name,
                    d.manufacturer,
                    d.system,
                    f"{d.diameter_mm:g}",
                    f"{d.length_mm:g}",
                    d.connection,
                    d.notes,
                ]
            )
    return paths


def prepared(d: ImplantDesign, **mesh_options: float) -> render.PreparedMesh:
    """The design's mesh in the render's view frame (as load_mesh would give it)."""
    vertices, faces = implant_mesh(d, **mesh_options)  # type: ignore[arg-type]
    frame = vertices[:, [1, 2, 0]]  # model z (platform up) -> view y
    lo, hi = frame.min(axis=0), frame.max(axis=0)
    frame = frame - (lo + hi) / 2
    return render.PreparedMesh(
        frame,
        faces.astype(np.int32),
        float(np.linalg.norm(frame, axis=1).max()),
        float(hi[1] - lo[1]),
        float(hi[0] - lo[0]),
    )


def clean_render(
    d: ImplantDesign, *, turn: float = 0, tilt: float = 0, size: int = 320
) -> Image.Image:
    """A catalogue-style render: plain background, low noise."""
    mesh = prepared(d)
    settings = render.RenderSettings(size=size)
    rng = np.random.default_rng(np.random.SeedSequence([synth.hash_design(d), 7]))
    return Image.fromarray(render.draw_view(mesh, turn, tilt, settings, rng))


def query_render(d: ImplantDesign, *, seed: int, index: int = 0, size: int = 320) -> Image.Image:
    """A render like a clinical X-ray of the implant: any turn, tilted up to 25 degrees
    either way and rolled in the image, off centre, in bone, beside a tooth and under a
    crown, then synth's degradations (crop, blur, gamma, noise, flips)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4, synth.hash_design(d), index]))
    mesh = prepared(d)
    turn, tilt = float(rng.uniform(0, 360)), float(rng.uniform(-25, 25))
    roll = float(rng.uniform(-25, 25))
    scale = render.px_per_mm(mesh, size) * float(rng.uniform(0.75, 1.05))
    shift = float(rng.uniform(-0.08, 0.08)) * size / scale
    camera = mesh.vertices @ drr.rotation(turn, tilt, roll).T + [shift, 0, 0]
    lengths = drr.path_lengths(camera, mesh.faces, size, scale)
    canvas = Image.new("L", (size, size), 0)
    centre = (size / 2 + shift * scale, size / 2)
    synth._draw_neighbours(rng, canvas, d, centre, scale)
    extra = np.asarray(canvas, dtype=np.float64) / 255 * 2.5
    physics = drr.Physics("titanium", "bone", float(rng.uniform(0.05, 0.12)), 3e3)
    image = Image.fromarray(drr.radiograph(lengths, physics, scale, rng, extra=extra))
    return synth._degrade(rng, image)


def three_drawings(d: ImplantDesign, *, seed: int = 0, size: int = 320) -> list[Image.Image]:
    """The same implant as synth's 2D catalogue view, a clean render, a query render."""
    flat = synth.render_view(d, seed=seed, query=False, size=(size, size))
    return [flat, clean_render(d, size=size), query_render(d, seed=seed, size=size)]


__all__ = [
    "clean_render",
    "implant_mesh",
    "prepared",
    "query_render",
    "three_drawings",
    "write_models",
]
