"""Synthetic implant radiographs for the demo, tests and benchmarks.

Each implant system is parametric (body shape, diameter, length, thread pitch,
depth and profile, apex, collar, internal connection) and is drawn radiopaque
(bright) on a textured, bone-like dark background. Catalogue views are clean, at
a few angles; query views add what real X-rays do to an implant: rotation,
scale, blur, noise, gamma, partial crops, flips (upper jaw) and neighbouring
teeth and crowns. Everything derives from the seed: same seed, same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from raiox_cli.catalogue.scan import implant_key

MANUFACTURERS = (
    "Acme Dental",
    "Borealis Implants",
    "Corvid Medical",
    "Dentara",
    "Elbrus Bio",
    "Fjord Implant Systems",
    "Gaia Dental",
    "Helix Ortho",
)
SYSTEM_WORDS = ("Active", "Bone Level", "Conus", "Delta", "Evo", "Flex", "Grip", "Hydra", "Ion")
CONNECTIONS = ("internal hex", "conical", "tri-channel", "external hex")
THREADS = ("v", "square", "buttress")
APEXES = ("rounded", "pointed", "flat")
CSV_COLUMNS = ("name", "manufacturer", "system", "diameter_mm", "length_mm", "connection", "notes")

CATALOGUE_ANGLES = (0.0, -7.0, 7.0, -14.0, 14.0, 3.5, -3.5, 10.5)
SUPERSAMPLE = 2


@dataclass(frozen=True)
class ImplantDesign:
    """What distinguishes one implant system from another on an X-ray."""

    manufacturer: str
    system: str
    name: str
    body: str  # "parallel" or "tapered"
    diameter_mm: float
    length_mm: float
    thread_pitch_mm: float
    thread_depth_mm: float
    thread_profile: str  # "v", "square", "buttress"
    apex: str  # "rounded", "pointed", "flat"
    collar_mm: float
    connection: str
    taper: float  # apical diameter / coronal diameter (1.0 for parallel)

    @property
    def key(self) -> str:
        return implant_key(self.manufacturer, self.system, self.name)

    @property
    def notes(self) -> str:
        return (
            f"{self.body} body, {self.thread_profile}-thread pitch {self.thread_pitch_mm} mm, "
            f"{self.apex} apex, collar {self.collar_mm} mm"
        )


@dataclass(frozen=True)
class SynthImplant:
    design: ImplantDesign
    key: str
    folder: Path  # the implant's catalogue folder
    views: list[Path]
    queries: list[Path]


@dataclass(frozen=True)
class SynthInfo:
    root: Path
    catalogue: Path  # root/catalogue: pass this to `raiox ingest`
    queries_dir: Path  # root/queries: same layout, labelled by folder
    csv: Path
    implants: list[SynthImplant] = field(default_factory=list)

    @property
    def catalogue_files(self) -> list[Path]:
        return [p for i in self.implants for p in i.views]

    @property
    def query_files(self) -> list[Path]:
        return [p for i in self.implants for p in i.queries]

    def label_of(self, query: Path) -> str:
        """The implant key a query image shows."""
        for implant in self.implants:
            if query in implant.queries:
                return implant.key
        raise KeyError(query)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def design_systems(count: int, seed: int = 0) -> list[ImplantDesign]:
    """`count` distinct implant systems, deterministic in the seed."""
    designs = []
    for index in range(count):
        rng = _rng(seed, 1, index)
        manufacturer = MANUFACTURERS[index % len(MANUFACTURERS)]
        word = SYSTEM_WORDS[(index // len(MANUFACTURERS)) % len(SYSTEM_WORDS)]
        series = index // (len(MANUFACTURERS) * len(SYSTEM_WORDS))
        body = ("parallel", "tapered")[(index + index // 3) % 2]
        system = f"{manufacturer.split()[0]} {word}" + (f" {series + 1}" if series else "")
        diameter = float(rng.choice([3.3, 3.5, 3.75, 4.0, 4.1, 4.3, 4.8, 5.0]))
        length = float(rng.choice([8.0, 8.5, 10.0, 11.5, 13.0]))
        designs.append(
            ImplantDesign(
                manufacturer=manufacturer,
                system=system,
                name=f"{system} {body.capitalize()} {diameter:g}x{length:g}",
                body=body,
                diameter_mm=diameter,
                length_mm=length,
                thread_pitch_mm=round(float(rng.uniform(0.6, 1.3)), 2),
                thread_depth_mm=round(float(rng.uniform(0.2, 0.45)), 2),
                thread_profile=THREADS[index % len(THREADS)],
                apex=APEXES[(index // len(THREADS)) % len(APEXES)],
                collar_mm=round(float(rng.choice([0.0, 0.5, 1.0, 1.8])), 1),
                connection=CONNECTIONS[(index + index // 4) % len(CONNECTIONS)],
                taper=1.0 if body == "parallel" else round(float(rng.uniform(0.55, 0.8)), 2),
            )
        )
    return designs


# --- drawing --------------------------------------------------------------------


def _half_width(d: ImplantDesign, y_mm: np.ndarray, turn: np.ndarray | float = 0.0) -> np.ndarray:
    """Half the implant's width (mm) at each depth below its platform; 0 outside.
    `turn` (fraction of a revolution about the axis) advances the thread's phase: the
    helix of the 3D implant (synth3d.py); 0 is the outline this 2D drawing shows."""
    radius = np.full_like(y_mm, d.diameter_mm / 2)
    if d.body == "tapered":
        # Tapered from 40% of the length down to the apex.
        s = np.clip((y_mm - 0.4 * d.length_mm) / (0.6 * d.length_mm), 0, 1)
        radius = radius * (1 - (1 - d.taper) * s)
    phase = np.mod((y_mm - d.collar_mm) / d.thread_pitch_mm - turn, 1.0)
    if d.thread_profile == "v":
        crest = 1 - np.abs(2 * phase - 1)
    elif d.thread_profile == "square":
        crest = (phase < 0.5).astype(y_mm.dtype)
    else:  # buttress: flat coronal face, sloped apical face
        crest = phase
    threaded = (y_mm > d.collar_mm) & (y_mm < d.length_mm - 0.4)
    radius = np.where(threaded, radius - d.thread_depth_mm * (1 - crest), radius)
    apex_len = min(2.0, 0.25 * d.length_mm)
    s = np.clip((y_mm - (d.length_mm - apex_len)) / apex_len, 0, 1)
    if d.apex == "rounded":
        radius = radius * np.sqrt(np.clip(1 - s**2, 0, 1))
    elif d.apex == "pointed":
        radius = radius * (1 - 0.75 * s)
    else:  # flat, with a small chamfer
        radius = radius * (1 - 0.25 * np.clip((s - 0.8) / 0.2, 0, 1))
    inside = (y_mm >= 0) & (y_mm <= d.length_mm)
    return np.where(inside, np.maximum(radius, 0), 0)


def _socket_half_width(d: ImplantDesign, y_mm: np.ndarray) -> np.ndarray:
    """Half-width (mm) of the hollow connection + screw channel, which show darker."""
    dia = d.diameter_mm
    depth = {"internal hex": 2.2, "conical": 3.0, "tri-channel": 2.0, "external hex": 0.0}
    conn = depth[d.connection]
    channel_end = conn + 0.35 * d.length_mm
    if d.connection == "conical":
        width = 0.36 * dia - (0.36 - 0.2) * dia * np.clip(y_mm / conn, 0, 1)
    elif d.connection == "tri-channel":
        lobes = 0.03 * dia * (np.mod(y_mm / 0.5, 1.0) < 0.5)
        width = np.full_like(y_mm, 0.3 * dia) + lobes
    else:
        width = np.full_like(y_mm, 0.3 * dia)
    width = np.where(y_mm < conn, width, 0.14 * dia)  # then the narrower screw channel
    return np.where((y_mm >= 0) & (y_mm < channel_end), width, 0)


def _implant_layers(
    d: ImplantDesign, size: tuple[int, int], centre: tuple[float, float], px_per_mm: float
) -> tuple[Image.Image, Image.Image]:
    """(alpha, brightness) images of the upright implant, platform at the top.
    Only the implant's bounding box is computed (supersampled), then pasted."""
    width, height = size
    ss = SUPERSAMPLE
    half_w = (d.diameter_mm / 2 + 0.5) * px_per_mm
    top = centre[1] - d.length_mm * px_per_mm / 2
    x0 = max(0, int(centre[0] - half_w))
    x1 = min(width, math.ceil(centre[0] + half_w) + 1)
    y0 = max(0, int(top - px_per_mm))
    y1 = min(height, math.ceil(top + (d.length_mm + 0.5) * px_per_mm) + 1)
    alpha = Image.new("L", size, 0)
    bright = Image.new("L", size, 0)
    if x1 <= x0 or y1 <= y0:
        return alpha, bright
    ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss
    xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss
    y_mm = (ys - top) / px_per_mm
    dx_mm = np.abs(xs - centre[0]) / px_per_mm
    radius = _half_width(d, y_mm)[:, None]
    inside = dx_mm[None, :] <= radius
    # Brighter through the middle of the cylinder, where there is more metal.
    thickness = np.sqrt(np.clip(1 - (dx_mm[None, :] / np.maximum(radius, 1e-3)) ** 2, 0, 1))
    value = 205 + 45 * thickness
    socket = dx_mm[None, :] <= _socket_half_width(d, y_mm)[:, None]
    value = np.where(socket, value - 85, value)
    if d.connection == "external hex":
        hex_rows = (y_mm > -0.7) & (y_mm < 0)
        hexagon = hex_rows[:, None] & (dx_mm[None, :] <= 0.3 * d.diameter_mm)
        inside = inside | hexagon
        value = np.where(hexagon, 235, value)
    box = (x1 - x0, y1 - y0)
    alpha.paste(
        Image.fromarray((inside * 255).astype(np.uint8)).resize(box, Image.Resampling.BOX), (x0, y0)
    )
    value_img = Image.fromarray(np.clip(value, 0, 255).astype(np.uint8))
    bright.paste(value_img.resize(box, Image.Resampling.BOX), (x0, y0))
    return alpha, bright


def _bone(rng: np.random.Generator, size: tuple[int, int], clean: bool) -> np.ndarray:
    """Bone-like background: dark, smooth large-scale density + trabecular grain."""
    width, height = size
    coarse = rng.random((max(2, height // 48), max(2, width // 48)), dtype=np.float32)
    coarse_img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    fine = rng.random((max(2, height // 5), max(2, width // 5)), dtype=np.float32)
    fine_img = Image.fromarray((fine * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BILINEAR
    )
    base = 45 + 0.22 * np.asarray(coarse_img, dtype=np.float32)
    grain = (np.asarray(fine_img, dtype=np.float32) - 128) * (0.08 if clean else 0.16)
    # The crest of the jaw: denser bone lower down, soft tissue above.
    ramp = np.linspace(-12, 18, height, dtype=np.float32)[:, None]
    return base + grain + ramp


def _draw_neighbours(
    rng: np.random.Generator, canvas: Image.Image, d: ImplantDesign, centre, px_per_mm: float
) -> None:
    """A neighbouring tooth (root + crown) beside the implant and a crown on top of it."""
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    half_len = d.length_mm * px_per_mm / 2
    side = rng.choice([-1, 1])
    gap = (d.diameter_mm * 1.4 + rng.uniform(0.5, 2.0)) * px_per_mm
    tx = cx + side * gap
    root_w = rng.uniform(2.5, 3.5) * px_per_mm
    shade = int(rng.integers(120, 160))
    draw.polygon(
        [
            (tx - root_w, cy - half_len),
            (tx + root_w, cy - half_len),
            (tx + root_w * 0.3, cy + half_len * 1.1),
            (tx - root_w * 0.3, cy + half_len * 1.1),
        ],
        fill=shade,
    )
    crown_h = rng.uniform(0.45, 0.7) * half_len * 2
    draw.ellipse(
        (tx - root_w * 1.4, cy - half_len - crown_h, tx + root_w * 1.4, cy - half_len + 4),
        fill=min(255, shade + 40),
    )
    if rng.random() < 0.7:  # a crown (metal-ceramic: very bright) on the implant itself
        crown_w = d.diameter_mm * px_per_mm * rng.uniform(0.8, 1.1)
        draw.rounded_rectangle(
            (cx - crown_w, cy - half_len - crown_h, cx + crown_w, cy - half_len - 1),
            radius=crown_w / 3,
            fill=int(rng.integers(225, 250)),
        )


def render_view(
    d: ImplantDesign,
    *,
    seed: int,
    query: bool,
    size: tuple[int, int] = (256, 320),
    view: int = 0,
) -> Image.Image:
    """One greyscale radiograph-like view of an implant (catalogue or query)."""
    rng = _rng(seed, 2 if query else 3, hash_design(d), view)
    width, height = size
    px_per_mm = 0.62 * height / 13.0
    if query:
        px_per_mm *= rng.uniform(0.8, 1.2)
        angle = float(rng.uniform(-25, 25))
        centre = (width / 2 + rng.uniform(-0.08, 0.08) * width, height / 2)
    else:
        angle = CATALOGUE_ANGLES[view % len(CATALOGUE_ANGLES)]
        centre = (width / 2, height / 2)
    canvas = Image.fromarray(np.clip(_bone(rng, size, clean=not query), 0, 255).astype(np.uint8))
    if query:
        _draw_neighbours(rng, canvas, d, centre, px_per_mm)
    alpha, bright = _implant_layers(d, size, centre, px_per_mm)
    if angle:
        alpha = alpha.rotate(angle, Image.Resampling.BILINEAR, center=centre)
        bright = bright.rotate(angle, Image.Resampling.BILINEAR, center=centre)
    canvas = Image.composite(bright, canvas, alpha)
    if not query:
        return canvas.filter(ImageFilter.GaussianBlur(0.6))
    return _degrade(rng, canvas)


def _degrade(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    size = img.size
    if rng.random() < 0.5:  # partial crop, scaled back to the frame
        fx, fy = rng.uniform(0.7, 0.95, size=2)
        w, h = int(size[0] * fx), int(size[1] * fy)
        x0 = int(rng.integers(0, size[0] - w + 1))
        y0 = int(rng.integers(0, size[1] - h + 1))
        img = img.crop((x0, y0, x0 + w, y0 + h)).resize(size, Image.Resampling.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.8))))
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    gamma = float(rng.uniform(0.7, 1.4))
    contrast = float(rng.uniform(0.8, 1.2))
    pixels = np.clip((pixels**gamma - 0.5) * contrast + 0.5, 0, 1)
    pixels = pixels + rng.normal(0, rng.uniform(0.01, 0.05), pixels.shape).astype(np.float32)
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    if rng.random() < 0.4:  # an upper-jaw implant points up
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def hash_design(d: ImplantDesign) -> int:
    """A stable per-design integer (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(d.key.encode("utf-8")).digest()[:8], "little")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; no timestamps: same pixels, same bytes
    return buf.getvalue()


# --- the folder ---------------------------------------------------------------------


def make_catalogue(
    out: Path,
    *,
    systems: int = 6,
    views: int = 4,
    queries: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (256, 320),
) -> SynthInfo:
    """Write `out/catalogue/<Manufacturer>/<Implant name>/view_XX.png` plus
    `out/catalogue/catalogue.csv`, and labelled queries in
    `out/queries/<Manufacturer>/<Implant name>/q_XX.png`. `size` is (width, height)."""
    out = Path(out)
    catalogue_dir = out / "catalogue"
    queries_dir = out / "queries"
    implants = []
    for design in design_systems(systems, seed):
        folder = catalogue_dir / design.manufacturer / design.name
        query_folder = queries_dir / design.manufacturer / design.name
        folder.mkdir(parents=True, exist_ok=True)
        view_paths = []
        for v in range(views):
            path = folder / f"view_{v:02d}.png"
            path.write_bytes(
                png_bytes(render_view(design, seed=seed, query=False, size=size, view=v))
            )
            view_paths.append(path)
        query_paths = []
        if queries:
            query_folder.mkdir(parents=True, exist_ok=True)
        for q in range(queries):
            path = query_folder / f"q_{q:02d}.png"
            path.write_bytes(
                png_bytes(render_view(design, seed=seed, query=True, size=size, view=q))
            )
            query_paths.append(path)
        implants.append(SynthImplant(design, design.key, folder, view_paths, query_paths))
    csv_path = catalogue_dir / "catalogue.csv"
    _write_csv(csv_path, [i.design for i in implants])
    return SynthInfo(out, catalogue_dir, queries_dir, csv_path, implants)


def _write_csv(path: Path, designs: list[ImplantDesign]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for d in designs:
            writer.writerow(
                [
                    d.name,
                    d.manufacturer,
                    d.system,
                    f"{d.diameter_mm:g}",
                    f"{d.length_mm:g}",
                    d.connection,
                    d.notes,
                ]
            )


def angle_of(view: int) -> float:
    """The rotation (degrees) of catalogue view number `view`."""
    return CATALOGUE_ANGLES[view % len(CATALOGUE_ANGLES)]


__all__ = [
    "ImplantDesign",
    "SynthImplant",
    "SynthInfo",
    "angle_of",
    "design_systems",
    "make_catalogue",
    "render_view",
]
