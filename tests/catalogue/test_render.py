"""catalogue/render.py + drr.py: implant models -> radiograph-like catalogue views."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image
from typer.testing import CliRunner

from raiox_cli.catalogue import drr, render, scan
from raiox_cli.cli import app
from raiox_cli.errors import UnusableModel, UsageError
from raiox_cli.training import synth, synth3d

CLEAN = render.RenderSettings(turns=1, tilts=1, size=256, blur_mm=0, photons=0, mirror=False)


def _revolved(profile: list[tuple[float, float]], path: Path, sections: int = 256) -> Path:
    """A watertight solid of revolution about +z from an (r, z) profile whose ends
    lie on the axis, written as STL."""
    mesh = trimesh.creation.revolve(np.array(profile, dtype=float), sections=sections)
    assert mesh.is_watertight
    mesh.export(path)
    return path


def _cylinder(path: Path, radius: float = 2.0, height: float = 10.0) -> Path:
    return _revolved([(0, 0), (radius, 0), (radius, height), (0, height)], path)


def test_cylinder_path_lengths_follow_the_analytic_chord_within_1_percent(tmp_path) -> None:
    mesh = render.load_mesh(_cylinder(tmp_path / "cyl.stl"))
    assert mesh.length_mm == pytest.approx(10.0)  # the long axis found, vertical
    size = 512
    lengths = render.lengths_view(mesh, 0, 0, size)
    scale = render.px_per_mm(mesh, size)
    x_mm = (np.arange(size) + 0.5 - size / 2) / scale
    chord = 2 * np.sqrt(np.clip(4.0 - x_mm**2, 0, None))
    inside = np.abs(x_mm) < 1.95  # the last half-pixel before the silhouette is all edge
    rows = slice(size // 2 - 100, size // 2 + 100)
    error = np.abs(lengths[rows][:, inside] - chord[inside]) / chord[inside]
    assert error.max() < 0.01
    assert lengths[rows][:, np.abs(x_mm) > 2.05].max() == 0  # nothing outside the solid
    # The whole projection integrates to the volume: no seams, no double counting.
    assert lengths.sum() / scale**2 == pytest.approx(math.pi * 4 * 10, rel=2e-3)


def _tilted_cylinder_chords(
    size: int, scale: float, axis: np.ndarray, radius: float, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Analytic path lengths of parallel rays (camera z) through a cylinder centred on
    the origin along unit `axis`, and where each ray leaves through the side only."""
    centres = (np.arange(size) + 0.5 - size / 2) / scale
    x, y = np.meshgrid(centres, -centres)  # rows go down
    p = np.stack([x, y, np.zeros_like(x)], axis=-1)
    d = np.array([0.0, 0.0, 1.0])
    across = np.cross(axis, d)
    sine = np.linalg.norm(across)
    h = p @ (across / sine)  # distance from the ray to the axis
    half = np.sqrt(np.clip(radius**2 - h**2, 0, None)) / sine  # half chord along the ray
    # Along the ray p + s d, the foot of the perpendicular to the axis:
    d_perp = d - (d @ axis) * axis
    p_perp = p - (p @ axis)[..., None] * axis
    s_mid = -(p_perp @ d_perp) / (d_perp @ d_perp)
    ends = [(p @ axis) + (s_mid + k * half) * (d @ axis) for k in (-1, 1)]
    margin = 2 / scale
    side_only = (np.abs(ends[0]) < height / 2 - margin) & (np.abs(ends[1]) < height / 2 - margin)
    return 2 * half, side_only & (np.abs(h) < radius - margin)


@pytest.mark.parametrize(("tilt", "roll"), [(0, 0), (20, 0), (20, 45)])
def test_sliver_cylinder_matches_the_analytic_chord_in_any_pose(tilt, roll) -> None:
    """A CAD-style cylinder: 100,032 faces, 50k side slivers as long as the cylinder.
    Slivers run down the frame (tilted), and diagonally (rolled): pixel centres on
    every seam, between triangles scanned along rows and along columns."""
    mesh = trimesh.creation.cylinder(radius=2.0, height=10.0, sections=25008)
    assert mesh.is_watertight and len(mesh.faces) == 100_032
    rotation = drr.rotation(0, tilt, roll)
    # trimesh's cylinder runs along z; the model frame's long axis is y.
    to_model = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    camera = mesh.vertices @ to_model.T @ rotation.T
    size, scale = 512, 40.0
    lengths = drr.path_lengths(camera, mesh.faces, size, scale)
    axis = rotation @ np.array([0.0, 1.0, 0.0])
    chord, inside = _tilted_cylinder_chords(size, scale, axis, 2.0, 10.0)
    assert inside.sum() > 10_000
    error = np.abs(lengths[inside] - chord[inside]) / chord[inside]
    assert error.max() < 1e-4  # measured 1e-6: the 25,008-gon is all but round
    assert lengths.sum() / scale**2 == pytest.approx(math.pi * 4 * 10, rel=1e-3)


@pytest.mark.parametrize("width", [2.0, 0.2])
def test_pixel_centres_exactly_on_edges_count_once(width) -> None:
    """A box whose edges and face diagonals pass exactly through pixel centres: wide
    (scanned along rows) or tall and narrow (along columns), each centre is counted
    once (half-open: a centre on the left or top edge is in, right or bottom out)."""
    box = trimesh.creation.box(extents=(width, 2.0, 1.0))
    box.apply_translation((0.05, 0.05, 0))  # corners at half-pixel positions
    size, scale = 64, 10.0
    for turn in (0, 180):
        camera = box.vertices @ drr.rotation(turn, 0).T
        lengths = drr.path_lengths(camera, box.faces, size, scale)
        columns = np.flatnonzero(lengths.max(axis=0) > 0)
        rows = np.flatnonzero(lengths.max(axis=1) > 0)
        left = size / 2 + (0.05 - width / 2 if turn == 0 else -0.05 - width / 2) * scale
        assert columns[0] + 0.5 == pytest.approx(left) and len(columns) == round(width * 10)
        assert rows[0] + 0.5 == pytest.approx(size / 2 - 1.05 * scale) and len(rows) == 20
        block = lengths[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        assert np.allclose(block, 1.0) and lengths.sum() == pytest.approx(block.sum())


def test_a_closed_mesh_enters_as_often_as_it_leaves_at_every_pixel() -> None:
    """Coverage is exact: with depth 1 at every vertex, the signed sum is 0 at every
    pixel centre, also with vertices on pixel centres and edges through them (ties),
    and with triangles scanned along rows beside triangles scanned along columns."""
    rng = np.random.default_rng(0)
    meshes = [
        trimesh.creation.box((2, 3, 1)),
        trimesh.creation.icosphere(2, radius=2),
        trimesh.creation.annulus(1, 2, 3, sections=50),
        trimesh.creation.cylinder(radius=2, height=10, sections=3000),
    ]
    for trial in range(16):
        mesh = meshes[trial % len(meshes)]
        turn = trimesh.transformations.random_rotation_matrix(rng.random(3))[:3, :3]
        vertices = mesh.vertices @ turn.T
        if trial % 2:  # onto pixel centres (10 px/mm, 96 px): ties everywhere
            vertices[:, :2] = (np.round(vertices[:, :2] * 10 - 0.5) + 0.5) / 10
        along_rows, along_columns = drr._spans(
            vertices[:, :2], np.ones(len(vertices)), mesh.faces, 96, 10.0
        )
        assert len(along_rows[0]) and len(along_columns[0])
        signed = np.zeros((96, 96))
        drr._sum_parallel(along_rows, signed)
        drr._sum_parallel(along_columns, signed.T)
        assert np.abs(signed).max() < 1e-9, trial


def test_a_model_partly_outside_the_frame_is_cut_not_distorted() -> None:
    mesh = trimesh.creation.icosphere(3, radius=2)
    turn = trimesh.transformations.random_rotation_matrix(np.random.default_rng(1).random(3))
    vertices = mesh.vertices @ turn[:3, :3].T + np.array([2.5, -2.0, 0])  # off the corner
    for source in (None, 40.0):
        small = drr.path_lengths(vertices, mesh.faces, 64, 10.0, source)
        large = drr.path_lengths(vertices, mesh.faces, 128, 10.0, source)
        assert 0 < small.sum() < large.sum()
        assert np.abs(small - large[32:96, 32:96]).max() < 1e-9
    assert drr.path_lengths(vertices + np.array([1e3, 0, 0]), mesh.faces, 64, 10.0).max() == 0


def test_stepped_cylinder_shows_both_widths_in_the_right_ratio(tmp_path) -> None:
    model = _revolved(
        [(0, 0), (1.5, 0), (1.5, 6), (3.0, 6), (3.0, 12), (0, 12)], tmp_path / "step.stl"
    )
    render.render_catalogue([model], tmp_path / "out", CLEAN, jobs=1)
    png = tmp_path / "out" / "Unknown" / "step" / "rot000_tilt00.png"
    image = np.asarray(Image.open(png), dtype=np.float64)
    background = image[2, 2]
    wide = (image[image.shape[0] // 4] > background + 10).sum()  # platform up: wide on top
    narrow = (image[3 * image.shape[0] // 4] > background + 10).sum()
    assert wide / narrow == pytest.approx(2.0, abs=0.05)
    # Brightest through the thickest metal: the wide part's centre.
    assert image[image.shape[0] // 4].max() > image[3 * image.shape[0] // 4].max()


def _bumped(path: Path) -> Path:
    """A cylinder along z with a box on its +x side: which way it faces is visible."""
    body = trimesh.creation.cylinder(radius=2.0, height=10.0, sections=64)
    bump = trimesh.creation.box(extents=(1.0, 1.0, 2.0))
    bump.apply_translation((2.4, 0, 0))
    (body + bump).export(path)
    return path


def _edges(image: np.ndarray, row: int) -> tuple[int, int]:
    """First and last column of the row brighter than the frame's edge."""
    columns = np.flatnonzero(image[row].astype(int) > int(image[row, 0]) + 10)
    return int(columns[0]), int(columns[-1])


@pytest.mark.slow
def test_view_angles_and_mirrors_are_what_the_file_names_say(tmp_path) -> None:
    settings = render.RenderSettings(turns=4, tilts=2, max_tilt=30, size=256, photons=0)
    report = render.render_catalogue([_bumped(tmp_path / "bump.stl")], tmp_path / "out", settings)
    folder = tmp_path / "out" / "Unknown" / "bump"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert report.outcomes[0].views == len(names) == 16
    parsed = {render.parse_view_name(n) for n in names}
    assert parsed == {(t, tilt, m) for t in (0, 90, 180, 270) for tilt in (0, 30) for m in (0, 1)}

    def load(name: str) -> np.ndarray:
        return np.asarray(Image.open(folder / name))

    top, middle = 50, 128  # the cylinder alone; the bump's height
    (left_top, right_top), (left, right) = (
        _edges(load("rot000_tilt00.png"), r) for r in (top, middle)
    )
    assert right > right_top + 5 and abs(left - left_top) <= 1  # bump on the right
    (left_top, right_top), (left, right) = (
        _edges(load("rot180_tilt00.png"), r) for r in (top, middle)
    )
    assert left < left_top - 5 and abs(right - right_top) <= 1  # turned half round: left
    (left_top, right_top), (left, right) = (
        _edges(load("rot090_tilt00.png"), r) for r in (top, middle)
    )
    assert abs(left - left_top) <= 1 and abs(right - right_top) <= 1  # toward or away
    for name in names:
        if name.endswith("_mirror.png"):
            assert np.array_equal(load(name), load(name.replace("_mirror", ""))[:, ::-1])
    # A tilt of 30 degrees shortens the 10 mm cylinder to 10 cos 30 + 4 sin 30 mm.
    mesh = render.load_mesh(tmp_path / "bump.stl")
    for tilt in (0, 30):
        lengths = render.lengths_view(mesh, 90, tilt, 256)
        rows = np.flatnonzero(lengths.max(axis=1) > 0)
        height_mm = (rows[-1] - rows[0] + 1) / render.px_per_mm(mesh, 256)
        t = math.radians(tilt)
        assert height_mm == pytest.approx(10 * math.cos(t) + 4 * math.sin(t), abs=0.1)


def test_view_grid_names_round_trip() -> None:
    assert render.parse_views("12x3") == (12, 3)
    grid = render.view_grid(12, 3, 20)
    assert len(grid) == 36 and (30, 10) in grid and (330, 20) in grid
    for turn, tilt in grid:
        for mirrored in (False, True):
            name = render.view_name(turn, tilt, mirrored)
            assert render.parse_view_name(name) == (turn, tilt, mirrored)
    assert render.parse_view_name("view_00.png") is None


def test_absurd_scale_is_refused_naming_the_scale_that_fixes_it(tmp_path) -> None:
    metres = trimesh.creation.cylinder(radius=0.002, height=0.012, sections=32)
    metres.export(tmp_path / "metres.stl")
    with pytest.raises(UnusableModel, match=r"--scale 1000\b"):
        render.load_mesh(tmp_path / "metres.stl")
    assert render.load_mesh(tmp_path / "metres.stl", scale=1000).length_mm == pytest.approx(12)
    microns = trimesh.creation.cylinder(radius=2000, height=12000, sections=32)
    microns.export(tmp_path / "microns.stl")
    with pytest.raises(UnusableModel, match=r"--scale 0\.001\b"):
        render.load_mesh(tmp_path / "microns.stl")


def test_open_mesh_is_refused_and_a_small_hole_is_filled(tmp_path) -> None:
    open_mesh = trimesh.creation.cylinder(radius=2.0, height=10.0, sections=32)
    open_mesh.update_faces(np.arange(len(open_mesh.faces))[40:])  # a big hole in the side
    open_mesh.export(tmp_path / "open.obj")
    with pytest.raises(UnusableModel, match=r"not watertight: \d+ open edges"):
        render.load_mesh(tmp_path / "open.obj")
    one_missing = trimesh.creation.cylinder(radius=2.0, height=10.0, sections=32)
    one_missing.update_faces(np.arange(len(one_missing.faces))[1:])  # one triangle: safe
    one_missing.export(tmp_path / "nearly.ply")
    mesh = render.load_mesh(tmp_path / "nearly.ply")
    assert any("filled small holes" in note for note in mesh.notes)


def test_step_files_are_refused_with_how_to_convert(tmp_path) -> None:
    (tmp_path / "implant.step").write_text("ISO-10303-21;\n")
    with pytest.raises(UnusableModel, match="Export > STL"):
        render.load_mesh(tmp_path / "implant.step")


def test_huge_mesh_is_decimated_and_still_projects_right(tmp_path, monkeypatch) -> None:
    dense = trimesh.creation.cylinder(radius=2.0, height=10.0, sections=256).subdivide()
    dense.subdivide().export(tmp_path / "dense.stl")  # 16,384 faces
    monkeypatch.setattr(render, "MAX_FACES", 4000)
    mesh = render.load_mesh(tmp_path / "dense.stl")
    assert len(mesh.faces) <= 4000
    assert any("decimated from 16,384 to" in note for note in mesh.notes)
    lengths = render.lengths_view(mesh, 0, 0, 256)
    scale = render.px_per_mm(mesh, 256)
    assert lengths.sum() / scale**2 == pytest.approx(math.pi * 4 * 10, rel=0.05)


@pytest.mark.slow
def test_rendered_folder_is_an_ordinary_catalogue_and_rerendering_is_a_no_op(tmp_path) -> None:
    designs = synth.design_systems(2)
    models = synth3d.write_models(tmp_path / "models", designs, around=48, detail=0.3)
    settings = render.RenderSettings(turns=3, tilts=2, size=128)
    out = tmp_path / "catalogue"
    first = render.render_catalogue([tmp_path / "models"], out, settings, jobs=2)
    assert [o.status for o in first.outcomes] == ["rendered", "rendered"]
    assert first.images == 2 * 3 * 2 * 2
    found = scan.scan(out)
    assert not found.problems
    assert set(found.implants) == {d.key for d in designs}  # catalogue.csv beside the models
    record = found.implants[designs[0].key]
    assert record.diameter_mm == designs[0].diameter_mm
    assert record.connection == designs[0].connection

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = render.render_catalogue([models[0], models[1]], out, settings)
    assert [o.status for o in again.outcomes] == ["unchanged", "unchanged"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps

    fewer = render.RenderSettings(turns=2, tilts=1, size=128)
    render.render_catalogue([models[0]], out, fewer, jobs=1)
    folder = out / designs[0].manufacturer / designs[0].name
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "rot000_tilt00.png",
        "rot000_tilt00_mirror.png",
        "rot180_tilt00.png",
        "rot180_tilt00_mirror.png",
    ]
    assert len(scan.scan(out).implants) == 2  # the other implant's row and views stay


def test_same_seed_same_pixels_and_noise_follows_the_seed(tmp_path) -> None:
    mesh = synth3d.prepared(synth.design_systems(1)[0], around=32, detail=0.3)
    settings = render.RenderSettings(size=96, background="bone")
    one = render.draw_view(mesh, 30, 10, settings, render.view_rng(0, "ab" * 32, 30, 10))
    two = render.draw_view(mesh, 30, 10, settings, render.view_rng(0, "ab" * 32, 30, 10))
    other = render.draw_view(mesh, 30, 10, settings, render.view_rng(1, "ab" * 32, 30, 10))
    assert np.array_equal(one, two) and not np.array_equal(one, other)


def test_drr_physics_is_beer_lambert() -> None:
    lengths = np.zeros((8, 8))
    lengths[:, 4:] = 2.0
    physics = drr.Physics("titanium", "plain", blur_mm=0, photons=0)
    image = drr.radiograph(lengths, physics, 10.0, np.random.default_rng(0)).astype(float)
    shown = (image / 255) ** (1 / drr.GAMMA) * drr.WHITE_AT  # back to attenuation
    assert shown[0, 0] == pytest.approx(0.6, abs=0.03)  # soft tissue only
    assert shown[0, 7] == pytest.approx(0.6 + 1.5 * 2.0, abs=0.05)
    zirconia = drr.radiograph(
        lengths, drr.Physics("zirconia", "plain", 0, 0), 10.0, np.random.default_rng(0)
    )
    assert zirconia[0, 7] > image[0, 7]


# --- through the real CLI ------------------------------------------------------------

runner = CliRunner()


@pytest.mark.slow
def test_cli_renders_then_ingests_and_searches(migrated, tmp_path) -> None:
    designs = synth.design_systems(3)
    synth3d.write_models(tmp_path / "models", designs, around=48, detail=0.3)
    out = tmp_path / "renders"
    args = ["render", str(tmp_path / "models"), "--out", str(out), "--views", "4x2"]
    first = runner.invoke(app, [*args, "--size", "128", "--background", "bone", "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["images"] == 3 * 4 * 2 * 2
    assert {m["status"] for m in report["models"]} == {"rendered"}
    second = runner.invoke(app, [*args, "--size", "128", "--background", "bone"])
    assert second.exit_code == 0 and second.stdout.count("unchanged") == 3

    ingested = runner.invoke(app, ["ingest", str(out), "--json"])
    assert ingested.exit_code == 0, ingested.output
    assert json.loads(ingested.stdout)["new"] == 48
    query = synth3d.query_render(designs[1], seed=5, size=128)
    query.save(tmp_path / "query.png")
    found = runner.invoke(app, ["search", str(tmp_path / "query.png"), "-k", "3", "--json"])
    assert found.exit_code == 0, found.output
    keys = [m["key"] for m in json.loads(found.stdout)["matches"]]
    assert len(keys) == 3 and set(keys) == {d.key for d in designs}  # distinct implants


@pytest.mark.slow
def test_cli_refuses_unusable_models_with_exit_8_and_renders_the_rest(tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _cylinder(models / "good.stl")
    trimesh.creation.cylinder(radius=0.002, height=0.01).export(models / "metres.stl")
    leaky = trimesh.creation.cylinder(radius=2.0, height=10.0, sections=32)
    leaky.update_faces(np.arange(len(leaky.faces))[40:])
    leaky.export(models / "leaky.stl")
    (models / "implant.stp").write_text("ISO-10303-21;\n")
    result = runner.invoke(
        app, ["render", str(models), "--out", str(tmp_path / "out"), "--views", "2x1"]
    )
    assert result.exit_code == 8, result.output
    assert "metres.stl" in result.stderr and "--scale 1000" in result.stderr
    assert "leaky.stl: not watertight" in result.stderr
    assert "implant.stp: STEP" in result.stderr and "Export > STL" in result.stderr
    assert len(list((tmp_path / "out" / "Unknown" / "good").glob("*.png"))) == 4


def test_cli_usage_errors_exit_2(tmp_path) -> None:
    model = _cylinder(tmp_path / "cyl.stl")
    for bad in (["--views", "12"], ["--material", "gold"], ["--axis", "up"]):
        result = runner.invoke(app, ["render", str(model), "--out", str(tmp_path / "o"), *bad])
        assert result.exit_code == 2, (bad, result.output)
        assert bad[0] in result.stderr


# --- many views per implant stay one implant ----------------------------------------


def test_adapt_samples_implants_evenly_whatever_their_number_of_views() -> None:
    from raiox_cli.training import data as adapt_data
    from raiox_cli.training import loop
    from raiox_cli.training.options import AdaptOptions, Seeds

    def items(key: str, n: int) -> list[adapt_data.Item]:
        return [adapt_data.Item(key, f"{key}{i}", "catalogue", f"{key}/{i}") for i in range(n)]

    train = {
        "rendered": items("rendered", 72),
        **{f"photo{i}": items(f"photo{i}", 2) for i in range(5)},
    }
    data = adapt_data.Data(train=train, gallery=[], splits={}, held_out=[])
    options = AdaptOptions(batch_size=8, views=2)
    slots: dict[str, int] = dict.fromkeys(train, 0)
    for step in range(600):
        batch = loop.sample_batch(data, options, step, Seeds(0))
        for key, _item, _rng in batch[::2]:  # one per implant slot
            slots[key] += 1
    share = slots["rendered"] / sum(slots.values())
    assert share == pytest.approx(1 / 6, abs=0.03)  # 72 views: still one implant in six


@pytest.mark.slow
def test_a_rendered_implant_does_not_crowd_out_implants_with_two_photos(migrated, tmp_path) -> None:
    """A mixed catalogue: 2 photographs for each of 3 implants, plus 36 renders of the first."""
    info = synth.make_catalogue(tmp_path / "mixed", systems=3, views=2, queries=0, size=(96, 120))
    rendered = info.implants[0].design
    synth3d.write_models(tmp_path / "models", [rendered], around=32, detail=0.3)
    result = runner.invoke(
        app,
        ["render", str(tmp_path / "models"), "--out", str(info.catalogue), "--size", "96"],
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["ingest", str(info.catalogue)]).exit_code == 0
    for implant in info.implants[1:]:
        found = runner.invoke(app, ["search", str(implant.views[1]), "-k", "3", "--json"])
        keys = [m["key"] for m in json.loads(found.stdout)["matches"]]
        assert keys[0] == implant.key  # its own photo, not one of 74 images of another
        assert len(keys) == len(set(keys)) == 3  # one row per implant, however many views


@pytest.mark.slow
def test_demo_render_shows_the_rendered_catalogue_and_a_sheet_of_views(raiox_env, tmp_path) -> None:
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--render", "--out", str(out), "--systems", "2"])
    assert first.exit_code == 0, first.output
    assert "ingest: 64 new" in first.stderr  # 2 implants x 8 turns x 2 tilts x 2 (mirrors)
    assert "rendered views:" in first.stdout and first.stdout.count("should be") == 2
    with Image.open(out / "views-sheet.png") as img:
        assert img.height > 2 * 300  # two rows: three drawings, then the views
    assert len(list((out / "models").glob("*.stl"))) == 2
    second = runner.invoke(app, ["demo", "--render", "--out", str(out), "--systems", "2"])
    assert second.exit_code == 0 and "0 new, 0 updated, 64 unchanged" in second.stderr
    assert "reused" in second.stderr


def test_cone_beam_magnifies_the_silhouette_and_keeps_the_central_chord(tmp_path) -> None:
    angles = np.linspace(-math.pi / 2, math.pi / 2, 129)
    profile = [
        (3.0 * math.cos(a) if 0 < i < 128 else 0.0, 3.0 * math.sin(a)) for i, a in enumerate(angles)
    ]
    mesh = render.load_mesh(_revolved(profile, tmp_path / "ball.stl"))
    size, scale = 256, render.px_per_mm(mesh, 256)
    parallel = render.lengths_view(mesh, 0, 0, size)
    for source in (1e6, 15.0):
        cone = render.lengths_view(mesh, 0, 0, size, source_mm=source)
        centre = cone[size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].mean()
        assert centre == pytest.approx(6.0, rel=0.002)  # the ray through the centre: 2R
        columns = np.flatnonzero(cone[size // 2] > 0)
        edge_mm = (columns[-1] + 1 - size / 2) / scale
        expected = source * 3.0 / math.sqrt(source**2 - 9.0)  # tangent ray, centre plane
        assert edge_mm == pytest.approx(expected, abs=1.5 / scale)
    assert np.abs(render.lengths_view(mesh, 0, 0, size, source_mm=1e6) - parallel).max() < 1e-4
    with pytest.raises(UsageError, match="--cone 50"):
        render.RenderSettings(source_mm=50)
