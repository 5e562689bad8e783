"""`raiox implants` and `raiox implants show`: the catalogue from the terminal, through
the real CLI and the embedded PostgreSQL (GET /implants answers from the same query)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raiox_cli import config
from raiox_cli.cli import app
from raiox_cli.training import synth

runner = CliRunner()


@pytest.fixture
def ingested(migrated: config.Settings, tmp_path: Path) -> synth.SynthInfo:
    info = synth.make_catalogue(tmp_path / "synth", systems=4, views=2, queries=0, size=(96, 120))
    result = runner.invoke(app, ["ingest", str(info.catalogue)])
    assert result.exit_code == 0, result.output
    return info


def listed(*args: str) -> list[dict]:
    result = runner.invoke(app, ["implants", *args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total"] == len(data["items"])
    return data["items"]


def test_lists_filters_and_reads_at_80_columns(ingested: synth.SynthInfo) -> None:
    everything = listed()
    assert sorted(i["key"] for i in everything) == sorted(i.key for i in ingested.implants)
    assert all(i["images"] == 2 for i in everything)
    one = ingested.implants[1].design
    by_maker = listed("--manufacturer", one.manufacturer.upper())
    assert {i["manufacturer"] for i in by_maker} == {one.manufacturer}
    words = one.name.lower().split()[::-1]  # every word, in any order and case
    found = listed("--search", " ".join(words).upper())
    assert ingested.implants[1].key in [i["key"] for i in found]
    assert all(all(w in f"{i['key']} {i['name']}".lower() for w in words) for i in found)
    assert listed("--search", "no-such-implant") == []

    narrow = runner.invoke(app, ["implants"], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in narrow.stdout
    for implant in ingested.implants:
        assert any(implant.key in line for line in lines), implant.key
    wide = runner.invoke(app, ["implants"], env={"COLUMNS": "250"})
    header = next(line for line in wide.stdout.splitlines() if "key" in line)
    assert all(c in header for c in ("name", "manufacturer", "size mm", "images"))
    empty = runner.invoke(app, ["implants", "--search", "no-such-implant"])
    assert empty.exit_code == 0 and "no implant matches" in empty.stdout


def test_show_one_by_its_key_or_a_short_spelling(ingested: synth.SynthInfo) -> None:
    implant = ingested.implants[0]
    short = f"{implant.design.manufacturer.upper()}/{implant.design.name}"
    result = runner.invoke(app, ["implants", "show", short, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["key"] == implant.key and shown["name"] == implant.design.name
    assert shown["diameter_mm"] == pytest.approx(implant.design.diameter_mm)
    assert len(shown["images"]) == 2 and all(len(i["sha256"]) == 64 for i in shown["images"])
    assert "storage_key" not in json.dumps(shown)  # where the store keeps them is not news
    table = runner.invoke(app, ["implants", "show", implant.key], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert implant.key in table.stdout and "images (2)" in table.stdout
    assert f"{implant.design.diameter_mm:g}x{implant.design.length_mm:g}" in table.stdout

    missing = runner.invoke(app, ["implants", "show", implant.key[:-3]])
    assert missing.exit_code == 1
    assert missing.stderr.startswith("raiox implants show: no implant ")
    assert f"did you mean {implant.key!r}" in missing.stderr


def test_an_empty_catalogue_says_how_to_fill_it(migrated: config.Settings) -> None:
    result = runner.invoke(app, ["implants"])
    assert result.exit_code == 0, result.output
    assert "the catalogue is empty: raiox ingest FOLDER" in result.stdout
