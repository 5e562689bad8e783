"""The synthetic catalogue generator: layout, CSV, labels, determinism, speed."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raiox_cli.catalogue.scan import implant_key
from raiox_cli.training import synth


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_csv_and_labels(tmp_path: Path) -> None:
    info = synth.make_catalogue(tmp_path, systems=3, views=2, queries=2, size=(96, 120))
    assert len(info.implants) == 3
    assert len({i.key for i in info.implants}) == 3
    for implant in info.implants:
        d = implant.design
        assert implant.folder == info.catalogue / d.manufacturer / d.name
        assert [p.name for p in implant.views] == ["view_00.png", "view_01.png"]
        assert [p.parent for p in implant.queries] == [
            info.queries_dir / d.manufacturer / d.name
        ] * 2
        assert implant.key == implant_key(d.manufacturer, d.system, d.name)
        for query in implant.queries:
            assert info.label_of(query) == implant.key
    with info.csv.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(synth.CSV_COLUMNS)
    assert [(r["manufacturer"], r["name"]) for r in rows] == [
        (i.design.manufacturer, i.design.name) for i in info.implants
    ]
    assert {float(r["diameter_mm"]) for r in rows} <= {3.3, 3.5, 3.75, 4.0, 4.1, 4.3, 4.8, 5.0}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = synth.make_catalogue(tmp_path / "a", systems=2, views=2, queries=1, seed=7, size=(64, 80))
    b = synth.make_catalogue(tmp_path / "b", systems=2, views=2, queries=1, seed=7, size=(64, 80))
    c = synth.make_catalogue(tmp_path / "c", systems=2, views=2, queries=1, seed=8, size=(64, 80))
    assert _all_bytes(a.root) == _all_bytes(b.root)
    pngs_a = {v for k, v in _all_bytes(a.root).items() if k.endswith(".png")}
    pngs_c = {v for k, v in _all_bytes(c.root).items() if k.endswith(".png")}
    assert len(pngs_a) == len(pngs_c) == 6
    assert not pngs_a & pngs_c


def test_implant_is_bright_on_dark_bone(tmp_path: Path) -> None:
    design = synth.design_systems(1)[0]
    img = np.asarray(synth.render_view(design, seed=0, query=False, size=(128, 160)))
    assert img.shape == (160, 128)
    centre = img[60:100, 60:68].mean()
    corners = np.concatenate([img[:20, :20].ravel(), img[-20:, -20:].ravel()]).mean()
    assert centre > 180 and corners < 120


def test_views_and_queries_differ(tmp_path: Path) -> None:
    info = synth.make_catalogue(tmp_path, systems=1, views=2, queries=2, size=(96, 120))
    arrays = [np.asarray(Image.open(p)) for p in info.catalogue_files + info.query_files]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert not np.array_equal(arrays[i], arrays[j])


def test_designs_are_distinct_systems() -> None:
    designs = synth.design_systems(24)
    assert len({d.key for d in designs}) == 24
    assert {d.body for d in designs} == {"parallel", "tapered"}
    assert {d.thread_profile for d in designs} == set(synth.THREADS)
    assert {d.connection for d in designs} == set(synth.CONNECTIONS)
    assert {d.apex for d in designs} == set(synth.APEXES)


def test_fast_enough_for_benchmarks() -> None:
    design = synth.design_systems(1)[0]
    start = time.perf_counter()
    for view in range(10):
        synth.png_bytes(synth.render_view(design, seed=0, query=True, view=view))
    # a few ms each on a quiet core; generous bound for a loaded CI machine
    assert (time.perf_counter() - start) / 10 < 0.1
