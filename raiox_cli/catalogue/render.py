"""Implant models (STL, OBJ, PLY) -> an ordinary catalogue folder of radiograph-like views.

Each model is loaded and checked (units, watertightness, size), turned so its long
axis is the image's vertical with the platform up, and projected at a grid of turns
about that axis x tilts toward the viewer (drr.py), each view also mirrored. The
output is `<out>/<Manufacturer>/<Implant>/rot030_tilt10.png` + `<out>/catalogue.csv`,
which `raiox ingest` reads like any catalogue. A hidden `.render.json` in each implant
folder records what made its views, so a re-render of an unchanged model is a no-op.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raiox_cli.catalogue import drr
from raiox_cli.catalogue.scan import CSV_NAME, KNOWN_COLUMNS, NUMERIC_COLUMNS
from raiox_cli.errors import RaioxError, UnusableModel, UsageError

RENDER_VERSION = 1  # bump when the same settings would draw different pixels
MESH_SUFFIXES = (".stl", ".obj", ".ply")
CAD_FORMATS = {
    ".step": "STEP",
    ".stp": "STEP",
    ".iges": "IGES",
    ".igs": "IGES",
    ".sldprt": "SolidWorks",
    ".x_t": "Parasolid",
}
CAD_SUFFIXES = tuple(CAD_FORMATS)
MANIFEST = ".render.json"
# Millimetres assumed. An implant (with or without abutment) is 5-30 mm long; a
# model whose longest side is outside this range is in other units.
SANE_MM = (2.0, 100.0)
SCALES = (1000.0, 100.0, 25.4, 10.0, 0.1, 0.01, 0.001)  # m, dm?, inch, cm, 0.1 mm, ..., um
MAX_FACES = 400_000  # above: decimated (the projection's cost is linear in faces)
FILL = 0.9  # the implant's bounding sphere spans this much of the frame
MIN_SOURCE_MM = 100.0  # a cone beam's source: always outside a model of sane size
_VIEW_NAME = re.compile(r"^rot(\d{3})_tilt(\d{2})(_mirror)?\.png$")
AXES = {"x": (1, 0, 0), "y": (0, 1, 0), "z": (0, 0, 1)}


@dataclass(frozen=True)
class RenderSettings:
    turns: int = 12  # views about the long axis, evenly spaced over 360 degrees
    tilts: int = 3  # tilts toward the viewer, evenly from 0 to max_tilt
    max_tilt: float = 20.0
    mirror: bool = True
    size: int = 512
    supersample: int = 2
    material: str = "titanium"
    background: str = "plain"
    blur_mm: float = 0.05
    photons: float = 1e5
    seed: int = 0
    scale: float = 1.0  # model units -> mm
    axis: str | None = None  # "z", "-y", "0,0,1": apex -> platform; None: principal axis
    source_mm: float | None = None  # cone beam from a source this far; None: parallel rays

    def __post_init__(self) -> None:
        if self.material not in drr.MATERIALS:
            raise UsageError(f"--material {self.material!r}: give {' or '.join(drr.MATERIALS)}")
        if self.background not in drr.BACKGROUNDS:
            raise UsageError(
                f"--background {self.background!r}: give {' or '.join(drr.BACKGROUNDS)}"
            )
        if not 32 <= self.size <= 4096:
            raise UsageError(f"--size {self.size}: give 32 to 4096 pixels")
        if not 0 <= self.max_tilt <= 60:
            raise UsageError(f"--max-tilt {self.max_tilt:g}: give 0 to 60 degrees")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"--scale {self.scale:g}: give a positive factor (1000 for metres)")
        if self.axis is not None:
            parse_axis(self.axis)
        if self.source_mm is not None and not self.source_mm >= MIN_SOURCE_MM:
            raise UsageError(
                f"--cone {self.source_mm:g}: give at least {MIN_SOURCE_MM:g} mm (an "
                "intraoral tube is 200-400 mm from the implant)"
            )

    def physics(self) -> drr.Physics:
        return drr.Physics(self.material, self.background, self.blur_mm, self.photons)

    def views(self) -> list[tuple[int, int]]:
        return view_grid(self.turns, self.tilts, self.max_tilt)


def parse_views(text: str) -> tuple[int, int]:
    """'12x3' -> (12 turns about the long axis, 3 tilts)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or not (1 <= int(match[1]) <= 360 and 1 <= int(match[2]) <= 30):
        raise UsageError(f"--views {text!r}: give TURNSxTILTS, as in 12x3 (1-360 x 1-30)")
    return int(match[1]), int(match[2])


def view_grid(turns: int, tilts: int, max_tilt: float) -> list[tuple[int, int]]:
    """(turn, tilt) in whole degrees. Only tilts toward the viewer: tilting away
    at turn t is the mirror of tilting toward at turn t + 180, and mirrors are drawn."""
    tilt_values = [0.0] if tilts == 1 else list(np.linspace(0, max_tilt, tilts))
    return [(round(360 * k / turns) % 360, round(t)) for t in tilt_values for k in range(turns)]


def view_name(turn: int, tilt: int, mirrored: bool = False) -> str:
    return f"rot{turn:03d}_tilt{tilt:02d}{'_mirror' if mirrored else ''}.png"


def parse_view_name(name: str) -> tuple[int, int, bool] | None:
    """(turn, tilt, mirrored) from a view's file name; None for other files."""
    match = _VIEW_NAME.match(name)
    return (int(match[1]), int(match[2]), bool(match[3])) if match else None


# --- models -----------------------------------------------------------------------


@dataclass
class PreparedMesh:
    """A checked model in the view frame: long axis +y (platform up), centred, mm."""

    vertices: np.ndarray  # (n, 3) float64
    faces: np.ndarray  # (m, 3) int32
    radius_mm: float  # of the bounding sphere about the centre
    length_mm: float  # along the long axis
    width_mm: float  # across it
    notes: list[str] = field(default_factory=list)  # repairs and decimation, one line each


def load_mesh(path: Path, *, scale: float = 1.0, axis: str | None = None) -> PreparedMesh:
    """Read, check and orient one model file. UnusableModel says why and what to do."""
    import trimesh

    suffix = path.suffix.lower()
    if suffix in CAD_SUFFIXES:
        raise UnusableModel(
            f"{path.name}: {CAD_FORMATS[suffix]} (a CAD solid) is not read; export a mesh: "
            "in FreeCAD, select the body and File > Export > STL (or the manufacturer's "
            "STL download), then render the .stl"
        )
    if suffix not in MESH_SUFFIXES:
        raise UnusableModel(f"{path.name}: not a mesh file; give .stl, .obj or .ply")
    try:
        loaded = trimesh.load_mesh(path, process=True)
    except Exception as exc:  # trimesh raises many types for bad files
        raise UnusableModel(f"{path.name}: cannot read as {suffix[1:].upper()} ({exc})") from exc
    if isinstance(loaded, trimesh.Scene):
        loaded = loaded.to_mesh() if loaded.geometry else None
    if loaded is None or len(loaded.faces) == 0:
        raise UnusableModel(f"{path.name}: holds no triangles")
    mesh: trimesh.Trimesh = loaded
    notes: list[str] = []
    if scale != 1.0:
        mesh.apply_scale(scale)
    _check_units(path.name, float(mesh.extents.max()), scale)
    _make_watertight(path.name, mesh, notes)
    up = _long_axis(mesh, axis)
    vertices, faces = _to_view_frame(mesh, up)
    if len(faces) > MAX_FACES:
        before = len(faces)
        vertices, faces, cell = decimate(vertices, faces, MAX_FACES)
        notes.append(
            f"decimated from {before:,} to {len(faces):,} faces (vertex clustering, "
            f"{cell * 1000:.0f} um cells)"
        )
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return PreparedMesh(
        vertices,
        faces,
        float(np.linalg.norm(vertices, axis=1).max()),
        float(hi[1] - lo[1]),
        float(max(hi[0] - lo[0], hi[2] - lo[2])),
        notes,
    )


def _check_units(name: str, longest: float, scale: float) -> None:
    lo, hi = SANE_MM
    if lo <= longest <= hi:
        return
    fix = min(SCALES, key=lambda s: abs(math.log(longest * s / 12.0)))
    scaled = f" at --scale {scale:g}" if scale != 1.0 else ""
    raise UnusableModel(
        f"{name}: {longest:.4g} mm long{scaled}, not an implant's size ({lo:g}-{hi:g} mm); "
        f"models are read in millimetres: if this one is in other units, pass "
        f"--scale {fix * scale:g}"
    )


def _make_watertight(name: str, mesh: Any, notes: list[str]) -> None:
    """Repairs that cannot change the shape: merged duplicate vertices (done on load),
    consistent winding, outward normals, and triangle or quad holes filled. A mesh
    still open after them is refused: its path lengths would be wrong."""
    import trimesh

    if not mesh.is_watertight:
        open_edges = _open_edges(mesh)
        trimesh.repair.fill_holes(mesh)
        if not mesh.is_watertight:
            raise UnusableModel(
                f"{name}: not watertight: {_open_edges(mesh)} open edges (holes larger than "
                "a quad, or surfaces that do not meet); close it (MeshLab: Filters > "
                "Remeshing > Close Holes; Meshmixer: Analysis > Inspector) or export the "
                "model as a solid"
            )
        notes.append(f"filled small holes ({open_edges} open edges)")
    if not mesh.is_winding_consistent:
        trimesh.repair.fix_winding(mesh)
        if not mesh.is_winding_consistent:
            raise UnusableModel(
                f"{name}: faces are not consistently oriented (non-manifold edges?); "
                "repair it in MeshLab (Filters > Cleaning and Repairing)"
            )
        notes.append("made face winding consistent")
    if mesh.volume < 0:
        mesh.invert()
        notes.append("turned inside-out normals outward")


def _open_edges(mesh: Any) -> int:
    edges = np.sort(mesh.edges, axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int((counts == 1).sum())


def _long_axis(mesh: Any, axis: str | None) -> np.ndarray:
    """Unit vector from apex to platform: --axis, else the principal axis of least
    inertia (an implant is longer than wide), pointing along the model's own
    coordinate axis it is closest to (CAD models are drawn platform-up)."""
    if axis is not None:
        return parse_axis(axis)
    vectors = np.asarray(mesh.principal_inertia_vectors, dtype=np.float64)
    components = np.asarray(mesh.principal_inertia_components, dtype=np.float64)
    up = vectors[int(np.argmin(components))] / np.linalg.norm(vectors[int(np.argmin(components))])
    return up if up[int(np.argmax(np.abs(up)))] > 0 else -up


def parse_axis(text: str) -> np.ndarray:
    """'z', '-y' or '0,0.1,1' -> unit vector."""
    raw = text.strip().lower()
    sign = -1.0 if raw.startswith("-") else 1.0
    if raw.lstrip("+-") in AXES:
        return sign * np.array(AXES[raw.lstrip("+-")], dtype=np.float64)
    try:
        vector = np.array([float(p) for p in raw.split(",")], dtype=np.float64)
    except ValueError:
        vector = np.zeros(0)
    if vector.shape != (3,) or not np.isfinite(vector).all() or np.linalg.norm(vector) == 0:
        raise UsageError(f"--axis {text!r}: give x, y, z (or -x, ...) or a vector such as 0,0,1")
    return vector / np.linalg.norm(vector)


def _to_view_frame(mesh: Any, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices with `up` as +y and the model axis least aligned with it as +x, centred on
    the bounding box in that frame (so turning about the axis keeps the implant centred)."""
    reference = np.eye(3)[int(np.argmin(np.abs(up)))]
    x = reference - up * float(reference @ up)
    x /= np.linalg.norm(x)
    z = np.cross(x, up)
    frame = np.stack([x, up, z])  # rows: the new axes in model coordinates
    vertices = np.asarray(mesh.vertices, dtype=np.float64) @ frame.T
    centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    return vertices - centre, np.asarray(mesh.faces, dtype=np.int32)


def decimate(
    vertices: np.ndarray, faces: np.ndarray, target: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Vertex clustering on a grid sized for about `target` faces. Collapsing vertices
    keeps a closed surface closed (degenerate faces drop out), so path lengths stay
    right to within a cell."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    cell = math.sqrt(2 * float(area.sum()) / target)
    while True:
        keys = np.floor(vertices / cell).astype(np.int64)
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        merged = np.zeros((int(inverse.max()) + 1, 3))
        np.add.at(merged, inverse, vertices)
        merged /= np.bincount(inverse)[:, None]
        new = inverse[faces]
        keep = (new[:, 0] != new[:, 1]) & (new[:, 1] != new[:, 2]) & (new[:, 0] != new[:, 2])
        new = new[keep]
        if len(new) <= target:
            return merged, new.astype(np.int32), cell
        cell *= 1.25


# --- views ------------------------------------------------------------------------


def px_per_mm(mesh: PreparedMesh, size: int) -> float:
    return FILL * size / (2 * mesh.radius_mm)


def lengths_view(
    mesh: PreparedMesh,
    turn: float,
    tilt: float,
    size: int,
    supersample: int = 1,
    source_mm: float | None = None,
) -> np.ndarray:
    """Path lengths (mm) of one view, `size` square, anti-aliased by `supersample`;
    parallel rays, or a cone beam from a source `source_mm` away."""
    camera = mesh.vertices @ drr.rotation(turn, tilt).T
    scale = px_per_mm(mesh, size) * supersample
    fine = drr.path_lengths(camera, mesh.faces, size * supersample, scale, source_mm)
    return drr.downsample(fine, supersample)


def draw_view(
    mesh: PreparedMesh,
    turn: float,
    tilt: float,
    settings: RenderSettings,
    rng: np.random.Generator,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """One radiograph-like view (uint8, bright = attenuating)."""
    lengths = lengths_view(
        mesh, turn, tilt, settings.size, settings.supersample, settings.source_mm
    )
    return drr.radiograph(
        lengths, settings.physics(), px_per_mm(mesh, settings.size), rng, extra=extra
    )


def view_rng(seed: int, model_sha256: str, turn: int, tilt: int) -> np.random.Generator:
    """The generator of one view's noise and background: same inputs, same pixels."""
    model = int(model_sha256[:15], 16)
    return np.random.default_rng(np.random.SeedSequence([seed, model, turn, tilt]))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Job:
    """Some views of one model: what a worker process needs, as plain arrays."""

    vertices: np.ndarray
    faces: np.ndarray
    radius_mm: float
    sha256: str
    folder: Path
    views: tuple[tuple[int, int], ...]
    settings: RenderSettings


def _render_job(job: _Job) -> list[str]:
    """Draw and write the job's views (and mirrors); the file names written."""
    mesh = PreparedMesh(job.vertices, job.faces, job.radius_mm, 0.0, 0.0)
    names = []
    for turn, tilt in job.views:
        rng = view_rng(job.settings.seed, job.sha256, turn, tilt)
        image = draw_view(mesh, turn, tilt, job.settings, rng)
        _write_atomic(job.folder / view_name(turn, tilt), png_bytes(image))
        names.append(view_name(turn, tilt))
        if job.settings.mirror:
            mirrored = np.ascontiguousarray(image[:, ::-1])
            _write_atomic(job.folder / view_name(turn, tilt, True), png_bytes(mirrored))
            names.append(view_name(turn, tilt, True))
    return names


# --- metadata ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMeta:
    """The catalogue row a model's views get."""

    name: str
    manufacturer: str = "Unknown"
    system: str = ""
    diameter_mm: str = ""
    length_mm: str = ""
    connection: str = ""
    notes: str = ""

    @property
    def folder(self) -> str:
        """`Manufacturer/Implant` below the output root (no path separators inside)."""
        return f"{_safe(self.manufacturer)}/{_safe(self.name)}"

    def row(self) -> dict[str, str]:
        return {"path": self.folder, **asdict(self)}


def _safe(part: str) -> str:
    cleaned = re.sub(r"[/\\\x00-\x1f]", "-", part).strip().strip(".")
    return cleaned or "unnamed"


def model_meta(path: Path, flags: dict[str, str], rows: dict[str, dict[str, str]]) -> ModelMeta:
    """A model's metadata: its row in catalogue.csv beside it, else the flags, else
    the file's stem as the implant's name."""
    row = rows.get(path.name) or rows.get(path.stem) or {}
    values = {k: v for k, v in {**flags, **row}.items() if v}
    values.setdefault("name", path.stem)
    for column in NUMERIC_COLUMNS:
        raw = values.get(column, "")
        try:
            if raw and float(raw.replace(",", ".")) <= 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"{path.name}: {column} {raw!r} is not a positive number") from None
    known = {k: values[k] for k in ModelMeta.__dataclass_fields__ if k in values}
    return ModelMeta(**known)


def read_model_csv(folder: Path) -> dict[str, dict[str, str]]:
    """Rows of `folder/catalogue.csv` by their `model` (or `file`) column."""
    path = folder / CSV_NAME
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = {}
        for record in reader:
            values = {(k or "").strip().lower(): (v or "").strip() for k, v in record.items()}
            model = values.get("model") or values.get("file")
            if model:
                rows[Path(model).name] = {k: v for k, v in values.items() if k in KNOWN_COLUMNS}
    if not rows:
        raise UsageError(
            f"{path}: needs a model column naming each model file (with name, "
            "manufacturer, system, diameter_mm, length_mm, connection, notes)"
        )
    return rows


def _merge_catalogue_csv(out: Path, metas: Sequence[ModelMeta]) -> None:
    """Add or update the rendered implants' rows in `out/catalogue.csv`, keeping others."""
    path = out / CSV_NAME
    columns = ["path", *[c for c in KNOWN_COLUMNS if c != "path"]]
    rows: dict[str, dict[str, str]] = {}
    if path.is_file():
        with path.open(encoding="utf-8-sig", newline="") as fh:
            for record in csv.DictReader(fh):
                key = record.get("path") or f"{record.get('manufacturer')}/{record.get('name')}"
                rows[key] = {c: record.get(c) or "" for c in columns}
    for meta in metas:
        rows[meta.folder] = {c: meta.row().get(c, "") for c in columns}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[k] for k in sorted(rows))
    _write_atomic(path, buf.getvalue().encode("utf-8"))


# --- the catalogue ----------------------------------------------------------------


@dataclass
class ModelOutcome:
    model: Path
    folder: str | None = None  # Manufacturer/Implant below the output
    status: str = "rendered"  # rendered | unchanged | refused
    views: int = 0  # files written (mirrors included)
    message: str = ""  # refused: why; rendered: repairs and decimation
    faces: int = 0


@dataclass
class RenderReport:
    out: Path
    outcomes: list[ModelOutcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def refused(self) -> list[ModelOutcome]:
        return [o for o in self.outcomes if o.status == "refused"]

    @property
    def images(self) -> int:
        return sum(o.views for o in self.outcomes if o.status == "rendered")


Progress = Callable[[int, int], None]


def find_models(paths: Sequence[Path]) -> list[Path]:
    """The model files named, and those inside named folders (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.suffix.lower() in MESH_SUFFIXES + CAD_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    if not found:
        raise UsageError("no model files (.stl, .obj, .ply) in what was given")
    return found


def render_catalogue(
    models: Sequence[Path],
    out: Path,
    settings: RenderSettings,
    *,
    flags: dict[str, str] | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> RenderReport:
    """Render every model into `out` (an ordinary catalogue folder). A model whose file,
    metadata and settings are those its folder was drawn with is skipped; one that cannot
    be used is reported and skipped, the others go on."""
    import time

    started = time.perf_counter()
    report = RenderReport(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_rows: dict[Path, dict[str, dict[str, str]]] = {}
    pending: list[tuple[ModelOutcome, PreparedMesh, str, dict[str, Any]]] = []
    metas: list[ModelMeta] = []
    seen: dict[str, Path] = {}
    for model in find_models(models):
        outcome = ModelOutcome(model)
        report.outcomes.append(outcome)
        try:
            if model.parent not in csv_rows:
                csv_rows[model.parent] = read_model_csv(model.parent)
            meta = model_meta(model, flags or {}, csv_rows[model.parent])
            outcome.folder = meta.folder
            if meta.folder in seen:
                raise UnusableModel(
                    f"{model.name}: names the same implant as {seen[meta.folder].name} "
                    f"({meta.folder}); give each model its own name in catalogue.csv"
                )
            seen[meta.folder] = model
            sha = hashlib.sha256(model.read_bytes()).hexdigest()
            recipe = {"version": RENDER_VERSION, "model": sha, "settings": asdict(settings)}
            recipe["meta"] = asdict(meta)
            folder = out / meta.folder
            if not force and _unchanged(folder, recipe):
                outcome.status, outcome.views = "unchanged", len(_manifest(folder)["files"])
                metas.append(meta)
                continue
            mesh = load_mesh(model, scale=settings.scale, axis=settings.axis)
        except (UnusableModel, UsageError, OSError) as exc:
            outcome.status = "refused"
            outcome.message = str(exc) if isinstance(exc, RaioxError) else f"{model.name}: {exc}"
            continue
        outcome.faces = len(mesh.faces)
        outcome.message = "; ".join(mesh.notes)
        metas.append(meta)
        pending.append((outcome, mesh, sha, recipe))
    _draw_all(out, pending, settings, jobs, progress)
    if metas:
        _merge_catalogue_csv(out, metas)
    report.elapsed_s = time.perf_counter() - started
    return report


def _draw_all(
    out: Path,
    pending: list[tuple[ModelOutcome, PreparedMesh, str, dict[str, Any]]],
    settings: RenderSettings,
    jobs: int | None,
    progress: Progress | None,
) -> None:
    views = settings.views()
    per_view = 2 if settings.mirror else 1
    workers = max(1, jobs or os.cpu_count() or 1)
    chunk = max(1, math.ceil(len(views) / workers))
    work: list[tuple[int, _Job]] = []
    for index, (outcome, mesh, sha, _recipe) in enumerate(pending):
        folder = out / str(outcome.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # half-drawn until the new one is written
        for start in range(0, len(views), chunk):
            part = tuple(views[start : start + chunk])
            work.append(
                (
                    index,
                    _Job(mesh.vertices, mesh.faces, mesh.radius_mm, sha, folder, part, settings),
                )
            )
    total, done = sum(len(j.views) for _, j in work) * per_view, 0
    written: dict[int, list[str]] = {i: [] for i in range(len(pending))}
    if progress and total:
        progress(0, total)
    for index, names in _run(work, workers):
        written[index] += names
        done += len(names)
        if progress:
            progress(done, total)
    for index, (outcome, _mesh, _sha, recipe) in enumerate(pending):
        folder = out / str(outcome.folder)
        names = sorted(written[index])
        old = _manifest(folder).get("files", []) if (folder / MANIFEST).exists() else []
        for stale in set(old) - set(names):
            (folder / stale).unlink(missing_ok=True)
        for stale in folder.glob("rot*_tilt*.png"):  # views of an earlier grid
            if stale.name not in names:
                stale.unlink()
        _write_atomic(folder / MANIFEST, json.dumps({**recipe, "files": names}).encode())
        outcome.views = len(names)


def _run(work: list[tuple[int, _Job]], workers: int) -> Iterator[tuple[int, list[str]]]:
    """(model index, names written) per job: in this process for one worker or job,
    else in worker processes (spawned: this process may hold threads)."""
    if workers == 1 or len(work) <= 1:
        for index, job in work:
            yield index, _render_job(job)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(work)), context) as pool:
        futures = {pool.submit(_render_job, job): index for index, job in work}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _unchanged(folder: Path, recipe: dict[str, Any]) -> bool:
    manifest = _manifest(folder)
    files = manifest.pop("files", None)
    if not files or manifest != json.loads(json.dumps(recipe)):
        return False
    return all((folder / name).is_file() for name in files)


__all__ = [
    "ModelMeta",
    "PreparedMesh",
    "RenderReport",
    "RenderSettings",
    "UnusableModel",
    "draw_view",
    "lengths_view",
    "load_mesh",
    "parse_view_name",
    "parse_views",
    "render_catalogue",
    "view_grid",
    "view_name",
]
