"""training/synth3d.py: synth's implants as watertight meshes, drawn three ways."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from raiox_cli.training import synth, synth3d


@pytest.mark.parametrize("connection", synth.CONNECTIONS)
def test_synthetic_implants_are_watertight_solids(connection: str) -> None:
    design = next(d for d in synth.design_systems(8) if d.connection == connection)
    vertices, faces = synth3d.implant_mesh(design, around=48, detail=0.5)
    mesh = trimesh.Trimesh(vertices, faces, process=True)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    extents = mesh.extents
    assert extents[0] == pytest.approx(design.diameter_mm, rel=0.05)
    hex_mm = synth3d.EXTERNAL_HEX_MM if connection == "external hex" else 0
    assert extents[2] == pytest.approx(design.length_mm + hex_mm, rel=0.01)
    # Hollow (connection + screw channel): less than the solid outline would hold.
    assert mesh.volume < math.pi * (design.diameter_mm / 2) ** 2 * design.length_mm


def test_one_implant_three_ways() -> None:
    design = synth.design_systems(1)[0]
    flat, clean, query = synth3d.three_drawings(design, size=160)
    assert flat.size == clean.size == query.size == (160, 160)
    clean_px = np.asarray(clean, dtype=float)
    assert clean_px[80, 80] > clean_px[5, 5] + 60  # bright implant on a plain background
    again = synth3d.three_drawings(design, size=160)
    assert all(a.tobytes() == b.tobytes() for a, b in zip([flat, clean, query], again, strict=True))
