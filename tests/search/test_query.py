from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raiox_cli import images
from raiox_cli.cli import app
from raiox_cli.db import queries
from raiox_cli.errors import EmptyCatalogue, ModelMismatch
from raiox_cli.search import query as search
from raiox_cli.training import synth
from tests.helpers.catalogue import store_synthetic_catalogue

runner = CliRunner()

SYSTEMS = 6
VIEWS = 3


def build_catalogue(conn, embedder, root: Path) -> synth.SynthInfo:
    """A synthetic catalogue stored through the data layer, embedded by the real
    (tiny) model: the same rows ingest writes."""
    info = synth.make_catalogue(root, systems=SYSTEMS, views=VIEWS, queries=1, size=(96, 120))
    store_synthetic_catalogue(conn, embedder, info)
    return info


@pytest.fixture
def catalogue(conn, tiny_embedder, tmp_path: Path) -> synth.SynthInfo:
    return build_catalogue(conn, tiny_embedder, tmp_path / "synth")


def test_planted_query_ranks_its_implant_first(conn, tiny_embedder, catalogue) -> None:
    planted = catalogue.implants[2]
    result = search.search_image(
        conn, tiny_embedder, images.load_image(planted.views[1]), k=3, min_score=0.5
    )
    assert [m.rank for m in result.matches] == [1, 2, 3]
    assert result.matches[0].key == planted.key
    assert result.matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert result.matches[0].image_path == str(planted.views[1])
    assert result.confident
    scores = [m.score for m in result.matches]
    assert scores == sorted(scores, reverse=True)
    margins = [m.margin for m in result.matches]
    assert margins[0] == pytest.approx(scores[0] - scores[1])
    assert margins[-1] is not None  # one extra implant is fetched for the last margin


def test_top_k_are_distinct_implants_even_when_one_implant_fills_the_neighbourhood(
    conn, tiny_embedder, catalogue
) -> None:
    # Every implant has several near-identical images; ask for all implants.
    query = images.load_image(catalogue.implants[0].views[0])
    result = search.search_image(conn, tiny_embedder, query, k=SYSTEMS)
    keys = [m.key for m in result.matches]
    assert len(keys) == SYSTEMS == len(set(keys))
    # More than the catalogue holds: every implant once, no more.
    result = search.search_image(conn, tiny_embedder, query, k=SYSTEMS + 4)
    assert sorted(m.key for m in result.matches) == sorted(i.key for i in catalogue.implants)


def test_distinct_top_k_matches_exact_search(conn, tiny_embedder, catalogue) -> None:
    model = queries.active_model(conn)
    for implant in catalogue.implants:
        vector = tiny_embedder.embed_images([images.load_image(implant.queries[0]).image])[0]
        found, exact_used = search.nearest_implant_rows(conn, model, vector, k=3)
        exact = queries.exact_nearest_implants(conn, model, vector, k=3)
        assert not exact_used
        assert [r["id"] for r in found] == [r["id"] for r in exact]
        np.testing.assert_allclose(
            [r["score"] for r in found], [r["score"] for r in exact], atol=1e-5
        )


def test_growing_candidates_still_returns_k_implants(
    conn, tiny_embedder, catalogue, monkeypatch
) -> None:
    # A first batch of one image can hold only one implant: the batch must grow.
    monkeypatch.setattr(search, "MIN_CANDIDATES", 1)
    monkeypatch.setattr(search, "CANDIDATES_PER_IMPLANT", 1)
    model = queries.active_model(conn)
    vector = tiny_embedder.embed_images([images.load_image(catalogue.implants[0].views[0]).image])
    rows, exact_used = search.nearest_implant_rows(conn, model, vector[0], k=4)
    assert len({r["id"] for r in rows}) == 4 and not exact_used


def test_manufacturer_filter(conn, tiny_embedder, catalogue) -> None:
    wanted = catalogue.implants[1].design.manufacturer
    query = images.load_image(catalogue.implants[0].views[0])
    result = search.search_image(conn, tiny_embedder, query, k=3, manufacturer=wanted.upper())
    expected = {i.key for i in catalogue.implants if i.design.manufacturer == wanted}
    assert result.matches and {m.key for m in result.matches} == expected
    assert all(m.manufacturer == wanted for m in result.matches)


def test_explain_uses_the_hnsw_index_after_analyze(conn, tiny_embedder, catalogue) -> None:
    model = queries.active_model(conn)
    queries.analyze_embeddings(conn)
    vector = np.ones(tiny_embedder.dim, dtype=np.float32)
    search.nearest_implant_rows(conn, model, vector, k=3)  # session settings as search has them
    for manufacturer in (None, catalogue.implants[0].design.manufacturer):
        plan = queries.explain_nearest(
            conn, model, vector, k=3, candidates=100, manufacturer=manufacturer
        )
        assert f"Index Scan using {model.index_name}" in plan, plan
        assert "Seq Scan on image_embeddings" not in plan, plan


def test_tta_scores_the_best_orientation(conn, tiny_embedder, catalogue) -> None:
    planted = catalogue.implants[3]
    upside_down = images.load_image(planted.views[0])
    flipped = images.LoadedImage(
        **{
            **upside_down.__dict__,
            "image": upside_down.image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        }
    )
    plain = search.search_image(conn, tiny_embedder, flipped, k=3, tta=False)
    tta = search.search_image(conn, tiny_embedder, flipped, k=3, tta=True)
    assert tta.orientations == search.ORIENTATIONS
    assert tta.matches[0].key == planted.key
    assert tta.matches[0].orientation == "upside-down"
    assert tta.matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert tta.matches[0].score >= plain.matches[0].score


def test_refuses_other_model_and_empty_catalogue(conn, tiny_embedder, tmp_path) -> None:
    with pytest.raises(EmptyCatalogue):
        search.catalogue_model(conn, tiny_embedder.model_id)
    build_catalogue(conn, tiny_embedder, tmp_path / "s")
    with pytest.raises(ModelMismatch, match="reindex"):
        search.catalogue_model(conn, "ViT-B-32:laion2b_s34b_b79k")


# --- the command ------------------------------------------------------------------


def test_cli_search_table(conn, catalogue) -> None:
    planted = catalogue.implants[0]
    result = runner.invoke(app, ["search", str(planted.views[0]), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert planted.design.name in result.stdout
    assert "1.000" in result.stdout
    assert "meaningless" in result.stderr


def test_cli_search_json_schema(conn, catalogue) -> None:
    planted = catalogue.implants[4]
    result = runner.invoke(app, ["search", str(planted.views[2]), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {
        "query",
        "model_id",
        "k",
        "crop",
        "tta",
        "orientations",
        "confident",
        "min_score",
        "exact",
        "analysis_id",
        "matches",
        "trust",
    }
    assert data["trust"]["calibrated"] is False  # random weights: never calibrated
    assert data["model_id"] == "raiox-tiny:none" and data["k"] == 3
    assert len(data["matches"]) == 3
    first = data["matches"][0]
    assert set(first) == {
        "rank",
        "implant_id",
        "key",
        "name",
        "manufacturer",
        "system",
        "diameter_mm",
        "length_mm",
        "connection",
        "image_id",
        "storage_key",
        "source_path",
        "image_path",
        "score",
        "margin",
        "orientation",
    }
    assert first["key"] == planted.key and first["rank"] == 1
    assert first["diameter_mm"] == pytest.approx(planted.design.diameter_mm)
    assert data["tta"] and data["orientations"] == list(search.ORIENTATIONS)  # the default
    plain = runner.invoke(app, ["search", str(planted.views[2]), "--no-tta", "--json"])
    assert json.loads(plain.stdout)["orientations"] == ["original"]


def test_cli_no_confident_match(conn, catalogue) -> None:
    query = catalogue.implants[0].queries[0]
    result = runner.invoke(app, ["search", str(query), "--min-score", "1.01"])
    assert result.exit_code == 0, result.output
    assert "no confident match" in result.stdout
    assert (
        catalogue.implants[0].design.manufacturer.split()[0] in result.stdout
        or "#" in result.stdout
    )


def test_cli_save_records_analysis(conn, catalogue) -> None:
    planted = catalogue.implants[1]
    result = runner.invoke(
        app, ["search", str(planted.views[0]), "--save", "--client-id", "clinic-7", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    analysis = queries.get_analysis(conn, data["analysis_id"])
    assert analysis["status"] == "done" and analysis["client_id"] == "clinic-7"
    assert analysis["source"] == "cli" and analysis["model_id"] == "raiox-tiny:none"
    saved = queries.analysis_matches(conn, data["analysis_id"])
    assert [m["implant_key"] for m in saved] == [m["key"] for m in data["matches"]]
    assert saved[0]["implant_key"] == planted.key


def test_cli_crop(conn, catalogue) -> None:
    query = catalogue.implants[0].views[0]
    result = runner.invoke(app, ["search", str(query), "--crop", "0,0,0.5,0.5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["crop"] == [0, 0, 48, 60]


def test_cli_exit_codes(migrated, conn, tiny_embedder, tmp_path, monkeypatch) -> None:
    image = tmp_path / "x.png"
    Image.new("L", (40, 40), 90).save(image)
    empty = runner.invoke(app, ["search", str(image)])
    assert empty.exit_code == 6 and "raiox ingest" in empty.stderr
    build_catalogue(conn, tiny_embedder, tmp_path / "s")
    other = runner.invoke(app, ["search", str(image), "--model", "ViT-B-32"])
    assert other.exit_code == 5 and "reindex" in other.stderr
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    unreadable = runner.invoke(app, ["search", str(bad)])
    assert unreadable.exit_code == 7 and str(bad) in unreadable.stderr
    monkeypatch.setenv("RAIOX_DATABASE_URL", "postgresql://x@127.0.0.1:1/db")
    no_db = runner.invoke(app, ["search", str(image)])
    assert no_db.exit_code == 3 and "cannot connect" in no_db.stderr


def test_cli_contact_sheet(conn, catalogue, tmp_path) -> None:
    from raiox_cli.search import sheet

    out = tmp_path / "sheet.png"
    query = catalogue.implants[0].queries[0]
    result = runner.invoke(
        app, ["search", str(query), "--crop", "0,0,0.9,0.9", "--sheet", str(out), "-k", "3"]
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == sheet.sheet_size(3)
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    for column in range(4):  # the query and each reference image were drawn
        left = sheet.GAP + column * (sheet.TILE_W + sheet.GAP)
        tile = pixels[sheet.HEADER_H : sheet.HEADER_H + sheet.TILE_H, left : left + sheet.TILE_W]
        assert tile.std() > 10, f"tile {column} is blank"


def test_unreadable_query_fails_without_importing_torch(tmp_path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    code = (
        "import sys\n"
        f"sys.argv = ['raiox', 'search', {str(bad)!r}]\n"
        "from raiox_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(code, 'TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["7", "NO_TORCH"], proc.stdout + proc.stderr


def test_search_settings_do_not_outlive_the_transaction(conn, tiny_embedder, catalogue) -> None:
    # Pooled server connections must not carry enable_seqscan=off into other work.
    query = images.load_image(catalogue.implants[0].views[0])
    search.search_image(conn, tiny_embedder, query, k=2)
    assert conn.execute("SHOW enable_seqscan").fetchone()[0] == "off"
    conn.commit()
    assert conn.execute("SHOW enable_seqscan").fetchone()[0] == "on"


def test_cli_table_reads_at_80_columns(conn, catalogue, monkeypatch) -> None:
    """At 80 columns (an ssh session) each implant's name stays whole on one line and
    no header is cut; the details go under the name. A wide terminal keeps one row
    per implant, and --json carries every field either way."""
    view = catalogue.implants[0].views[0]
    monkeypatch.chdir(view.parent)  # the title holds the path as typed: a short one
    query = view.name
    answer = runner.invoke(app, ["search", query, "--json"])
    matches = json.loads(answer.stdout)["matches"]
    narrow = runner.invoke(app, ["search", query], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in narrow.stdout
    assert {"implant", "score", "margin"} <= set(lines[2].replace("┃", " ").split())
    for m in matches:
        assert any(m["name"] in line for line in lines), m["name"]
        assert any(m["manufacturer"] in line and m["system"] in line for line in lines)
        assert f"{m['score']:.3f}" in narrow.stdout
    wide = runner.invoke(app, ["search", query], env={"COLUMNS": "250"})
    assert wide.exit_code == 0, wide.output
    header = next(line for line in wide.stdout.splitlines() if "implant" in line)
    for column in ("manufacturer", "system", "size mm", "seen"):
        assert column in header
    for m in matches:
        assert any(
            m["name"] in line and m["manufacturer"] in line for line in wide.stdout.splitlines()
        )


def test_cli_random_weights_warning_is_said_once(conn, catalogue) -> None:
    result = runner.invoke(app, ["search", str(catalogue.implants[0].views[0])])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("meaningless") == 1, result.stderr
    batch = runner.invoke(app, ["search", *map(str, catalogue.implants[0].views[:2])])
    assert batch.exit_code == 0, batch.output
    assert batch.stderr.count("meaningless") == 1, batch.stderr
