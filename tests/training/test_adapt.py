"""raiox adapt and augment: the tiny model trained for a few steps, through the CLI,
on a real PostgreSQL. One training run is shared by the session; tests that change
the catalogue get their own database holding the same catalogue, so the finished
run is found again (same data, same settings) instead of trained again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image
from psycopg import sql
from typer.testing import CliRunner

from raiox_cli import config, db, embedding
from raiox_cli.catalogue.ingest import ingest_catalogue
from raiox_cli.cli import app
from raiox_cli.training import adapt, augment, loop, synth
from tests.helpers.env import TINY_ENV, database_url_on

runner = CliRunner()
SIZE = (64, 80)
STEPS = ["--steps", "24", "--batch-size", "16", "--eval-every", "6"]


# --- augment -------------------------------------------------------------------------


def _implant_picture() -> Image.Image:
    design = synth.design_systems(1, seed=3)[0]
    return synth.render_view(design, seed=3, query=False, size=(128, 160))


def test_augment_is_seeded_and_keeps_size() -> None:
    picture = _implant_picture()
    first = augment.augment(picture, np.random.default_rng([7, 1]))
    again = augment.augment(picture, np.random.default_rng([7, 1]))
    other = augment.augment(picture, np.random.default_rng([7, 2]))
    assert first.size == picture.size and first.mode == "L"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    untouched = augment.augment(picture, np.random.default_rng(0), augment.NONE)
    assert untouched.tobytes() == picture.tobytes()


def test_xray_augmentation_is_seeded_and_keeps_the_default_run_identity() -> None:
    """--augment xray: seeded, same size, other pixels than the default; the default's
    runs keep the fingerprint they had before --augment and --extra-labels existed (they
    still resume)."""
    import dataclasses
    import hashlib

    from raiox_cli.training import options as adapt_options

    picture = _implant_picture()
    first = augment.augment(picture, np.random.default_rng([7, 1]), augment.XRAY)
    again = augment.augment(picture, np.random.default_rng([7, 1]), augment.XRAY)
    plain = augment.augment(picture, np.random.default_rng([7, 1]))
    assert first.size == picture.size and first.tobytes() == again.tobytes()
    assert first.tobytes() != plain.tobytes()
    snapshot = {"sha256": "data"}
    default = adapt_options.AdaptOptions()
    before = {
        k: v
        for k, v in dataclasses.asdict(default).items()
        if k
        not in {"max_minutes", "checkpoint_every", "out", "apply", "force", "dry_run", "augment"}
        | {"extra_labels"}  # nor --extra-labels
    }
    text = json.dumps({"base": "b", "data": "data", "options": before}, sort_keys=True)
    assert (
        adapt_options.fingerprint("b", snapshot, default)
        == hashlib.sha256(text.encode()).hexdigest()
    )
    xray = dataclasses.replace(default, augment="xray")
    assert adapt_options.fingerprint("b", snapshot, xray) != adapt_options.fingerprint(
        "b", snapshot, default
    )
    extra = dataclasses.replace(default, extra_labels=Path("renders"))
    assert adapt_options.fingerprint("b", snapshot, extra) != adapt_options.fingerprint(
        "b", snapshot, default
    )
    with pytest.raises(adapt_options.UsageError, match="--augment 'film'"):
        adapt_options.validate(dataclasses.replace(default, augment="film"))


def test_neighbours_draw_beside_the_implant() -> None:
    picture = _implant_picture()
    before = np.asarray(picture, dtype=np.int16)
    after = np.asarray(augment.neighbours(picture, np.random.default_rng(1), crown=True))
    changed = np.abs(after.astype(np.int16) - before) > 20
    assert changed.any()
    # The implant is bright in the middle; the tooth lands to one side of it.
    columns = np.nonzero(changed.any(axis=0))[0]
    assert columns.min() < picture.width * 0.35 or columns.max() > picture.width * 0.65
    flat = Image.new("L", (64, 64), 40)
    assert augment.neighbours(flat, np.random.default_rng(1), crown=True) is flat


@pytest.mark.training
def test_loss_goes_down_on_a_fixed_batch() -> None:
    import torch

    tower = adapt.build_tower(
        embedding.ModelSpec("raiox-tiny", "none", None, "cpu"), adapt.AdaptOptions(), seed=0
    )
    assert tower.mode == "all"  # random weights: the whole tower trains
    designs = synth.design_systems(4, seed=1)
    pictures = [
        synth.render_view(d, seed=1, query=False, size=SIZE, view=v)
        for d in designs
        for v in range(2)
    ]
    pixels = torch.stack([tower.embedder.preprocess(p) for p in pictures])
    labels = torch.tensor([i for i in range(4) for _ in range(2)])
    optimizer = torch.optim.AdamW(tower.params, lr=1e-3)
    torch.manual_seed(0)
    losses = []
    tower.train_mode()
    for _ in range(15):
        z = torch.nn.functional.normalize(tower.visual(pixels), dim=-1)
        loss = adapt.multi_positive_infonce(z, labels, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.training
@pytest.mark.parametrize("mode", ["last", "lora"])
def test_partial_training_saves_a_plain_checkpoint(mode: str, tmp_path: Path) -> None:
    """--train last freezes all but the last blocks; LoRA adapters are merged into
    the weights, so the checkpoint loads through --weights like any other."""
    import torch

    spec = embedding.ModelSpec("raiox-tiny", "none", None, "cpu")
    tower = adapt.build_tower(spec, adapt.AdaptOptions(train=mode, blocks=1), seed=0)
    visual = tower.visual
    trainable = {n for n, p in visual.named_parameters() if p.requires_grad}
    if mode == "last":
        assert trainable and all(
            n.startswith(("transformer.resblocks.1.", "ln_post.", "proj")) for n in trainable
        )
    else:
        assert trainable and all(".parametrizations." in n for n in trainable)
    pictures = [_implant_picture().resize((64, 80)) for _ in range(4)]
    pixels = torch.stack([tower.embedder.preprocess(p) for p in pictures])
    optimizer = torch.optim.AdamW(tower.params, lr=1e-2)
    tower.train_mode()
    for _ in range(3):
        z = torch.nn.functional.normalize(tower.visual(pixels + torch.randn_like(pixels)), dim=-1)
        loss = adapt.multi_positive_infonce(z, torch.tensor([0, 0, 1, 1]), 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tower.eval_mode()
    trained = tower.embedder.embed_images(pictures)
    path = tmp_path / "model.safetensors"
    adapt.save_weights(tower, tower.visual.state_dict(), path)
    loaded = embedding.load_embedder(embedding.ModelSpec("raiox-tiny", "none", path, "cpu"))
    np.testing.assert_allclose(loaded.embed_images(pictures), trained, atol=1e-5)
    base = embedding.load_embedder(spec).embed_images(pictures)
    assert not np.allclose(base, trained, atol=1e-4)


def test_rank_metrics_rank_implants_by_their_best_image() -> None:
    gallery = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]  # implant 2 has two images
    labels = np.array([0, 1, 2, 2])
    queries = np.array([[[1, 0, 0]], [[0, 0.6, 0.8]], [[0, 0, 1]]], dtype=np.float32)
    m = adapt.rank_metrics(queries, [0, 1, 2], gallery, labels, 3)
    assert m["n"] == 3 and m["top1"] == pytest.approx(2 / 3) and m["top3"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 0.5 + 1) / 3)


def _items(key: str, tag: str, kind: str, *, implants: int, each: int) -> list[adapt.Item]:
    """`each` images of `implants` implants keyed key+k, their sha256 tag+"k-v"."""
    return [
        adapt.Item(f"{key}{k}", f"{tag}{k}-{v}", kind, f"{tag or 'i'}{k}/{v}")
        for k in range(implants)
        for v in range(each)
    ]


def test_splits_hold_out_whole_implants_and_never_train_on_queries() -> None:
    items = _items("m/s/i", "", "catalogue", implants=10, each=4)
    xrays = _items("m/s/i", "x", "xray", implants=10, each=2)
    data = adapt.split_data(items, xrays, [], adapt.AdaptOptions(), np.random.default_rng(0))
    assert len(data.held_out) == 2
    trained = {i.sha256 for v in data.train.values() for i in v}
    queries = {i.sha256 for q in data.splits.values() for i in q}
    assert not trained & queries
    assert not set(data.held_out) & set(data.train)
    assert {i.key for i in data.splits["unseen"]} == set(data.held_out)
    assert all(i.kind == "xray" for i in data.splits["unseen"])
    assert len(data.splits["catalogue"]) == 8 and len(data.splits["xrays"]) == 3
    again = adapt.split_data(items, xrays, [], adapt.AdaptOptions(), np.random.default_rng(0))
    assert again.snapshot() == data.snapshot()


def test_extra_designs_only_train_and_never_those_of_a_held_out_implant() -> None:
    """--extra-labels: designs outside the catalogue join training as implants of their
    own; none is searched or validated on, and an extra image of a catalogue implant
    held out of training is left out (it would leak into the unseen validation)."""
    items = _items("m/s/i", "", "catalogue", implants=10, each=4)
    extra = _items("extra:other/design ", "e", "extra", implants=30, each=3)
    options = adapt.AdaptOptions()
    plain = adapt.split_data(items, [], [], options, np.random.default_rng(0))
    extra += [adapt.Item(key, f"more-{key}", "extra", key) for key in ("m/s/i0", *plain.held_out)]
    data = adapt.split_data(items, [], [], options, np.random.default_rng(0), extra)
    assert data.held_out == plain.held_out  # extras change nothing the catalogue decides
    assert data.splits == plain.splits and data.gallery == plain.gallery
    assert len(data.train) == len(plain.train) + 30
    assert all(len(data.train[f"extra:other/design {k}"]) == 3 for k in range(30))
    assert {i.sha256 for i in data.train["m/s/i0"]} == {i.sha256 for i in plain.train["m/s/i0"]} | {
        "more-m/s/i0"
    }
    assert data.skipped == [
        f"{key}: its implant is held out of training this run" for key in plain.held_out
    ]
    snap, before = data.snapshot(), plain.snapshot()
    assert (snap["extra_images"], snap["extra_implants"]) == (91, 30)
    assert (before["extra_images"], before["extra_implants"]) == (0, 0)
    assert snap["implants"] == before["implants"] == 10
    assert snap["trained_implants"] == before["trained_implants"] == 8
    assert snap["sha256"] != before["sha256"]
    drawn = {
        key
        for step in range(20)
        for key, _, _ in loop.sample_batch(data, options, step, adapt.Seeds(0))
    }
    assert any(k.startswith("extra:") for k in drawn)
    assert any(not k.startswith("extra:") for k in drawn)


# --- the command ---------------------------------------------------------------------


def _env(database_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_")}
    env.update(TINY_ENV, RAIOX_HOME=str(home), RAIOX_DATABASE_URL=database_url)
    return env


def _new_database(server_url: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url_on(server_url, name)


def _ingested(env: dict[str, str], info: synth.SynthInfo) -> config.Settings:
    settings = config.resolve(env)
    db.migrate(settings)
    report = ingest_catalogue(settings, info.catalogue)
    assert report.ok, report.to_dict()
    return settings


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthInfo:
    root = tmp_path_factory.mktemp("adapt-synth")
    return synth.make_catalogue(root, systems=6, views=4, queries=2, size=SIZE, seed=5)


@pytest.fixture(scope="session")
def trained(
    pg_server_url: str, synthetic: synth.SynthInfo, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """One run of `raiox adapt` on the synthetic catalogue (its queries validate)."""
    home = tmp_path_factory.mktemp("adapt-home")
    env = _env(_new_database(pg_server_url), home)
    _ingested(env, synthetic)
    out = home / "run"
    args = ["adapt", "--val-labels", str(synthetic.queries_dir), *STEPS, "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    return {"env": env, "out": out, "args": args, "report": json.loads(result.stdout)}


@pytest.mark.training
def test_run_writes_weights_and_a_complete_card(trained: dict) -> None:
    report = trained["report"]
    card = json.loads((trained["out"] / "model-card.json").read_text())
    assert card == report["card"]
    assert card["base_model_id"] == "raiox-tiny:none"
    assert card["model_id"].startswith("raiox-tiny:file:")
    digest = hashlib.sha256((trained["out"] / "model.safetensors").read_bytes()).hexdigest()
    assert card["weights_sha256"] == digest and card["model_id"].endswith(digest[:16])
    assert card["training"]["steps"] == 24 and card["training"]["stopped"] == "completed"
    assert card["data"]["implants"] == 6 and card["data"]["catalogue_images"] == 24
    assert card["data"]["xrays"] == 12 and len(card["data"]["sha256"]) == 64
    assert card["data"]["held_out_implants"] and card["data"]["validation_queries"]["unseen"] == 2
    for when in ("before", "after"):
        for split in ("catalogue", "xrays", "unseen", "all"):
            assert 0 <= card["metrics"][when][split]["mrr"] <= 1
    assert [h["step"] for h in card["history"]] == [6, 12, 18, 24]
    assert card["hyperparameters"]["train"] == "all" and card["hyperparameters"]["lr"] == 1e-3
    assert card["seed"] == 0 and card["device"].startswith("cpu")
    assert {"torch", "open_clip", "numpy", "raiox"} <= set(card["versions"])
    assert not (trained["out"] / "state.pt").exists()


@pytest.mark.training
def test_weights_load_through_weights_with_the_cards_model_id(
    trained: dict, synthetic: synth.SynthInfo
) -> None:
    card = trained["report"]["card"]
    weights = str(trained["out"] / "model.safetensors")
    image = str(synthetic.query_files[0])
    result = runner.invoke(
        app, ["embed", image, "--model", "raiox-tiny", "--weights", weights], env=trained["env"]
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.splitlines()[0])
    assert line["model_id"] == card["model_id"]
    base = runner.invoke(app, ["embed", image], env=trained["env"])
    assert json.loads(base.stdout.splitlines()[0])["embedding"] != line["embedding"]


@pytest.mark.training
def test_same_command_again_finds_the_finished_run(trained: dict) -> None:
    start = time.monotonic()
    result = runner.invoke(app, [*trained["args"], "--json"], env=trained["env"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["card"] == trained["report"]["card"]
    assert time.monotonic() - start < 30


@pytest.mark.training
def test_dry_run_summarises_and_trains_nothing(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "dry"
    args = [a if a != str(trained["out"]) else str(out) for a in trained["args"]]
    result = runner.invoke(app, [*args, "--dry-run"], env=trained["env"])
    assert result.exit_code == 0, result.output
    assert "6 implants (5 trained, 1 held out)" in result.stdout
    assert "24 steps planned, about" in result.stdout and "nothing trained" in result.stdout
    assert not out.exists()


@pytest.mark.training
def test_kill_9_then_the_same_command_resumes(
    trained: dict, synthetic: synth.SynthInfo, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    args = [a if a != str(trained["out"]) else str(out) for a in trained["args"]]
    command = [sys.executable, "-m", "raiox_cli", *args, "--checkpoint-every", "1", "--json"]
    proc = subprocess.Popen(
        command, env=trained["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = out / "state.pt"
    deadline = time.monotonic() + 240
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists():
            with contextlib.suppress(Exception):  # caught mid-rename: try again
                step = adapt.load_state(state)["state"]["step"]
            if step >= 8:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 <= adapt.load_state(state)["state"]["step"] < 24
    done = subprocess.run(command, env=trained["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["resumed_from"] >= 8
    assert report["card"]["training"]["steps"] == 24
    assert report["card"]["training"]["resumed"] == 1
    # Same batches, same optimiser state: the weights of the uninterrupted run (up to
    # float summation order: a loaded machine can make the math library change its
    # thread count; OMP_NUM_THREADS=1 gives the same bytes) and the same validations.
    from safetensors.numpy import load_file

    resumed, straight = load_file(report["weights"]), load_file(trained["report"]["weights"])
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        np.testing.assert_allclose(resumed[name], tensor, atol=1e-4, err_msg=name)
    history = [(h["step"], h["metrics"]) for h in report["card"]["history"]]
    assert history == [(h["step"], h["metrics"]) for h in trained["report"]["card"]["history"]]


def _search_loop(env: dict[str, str], query: Path, seconds: float) -> subprocess.Popen:
    code = f"""
import json, sys, time
from raiox_cli import config, db, embedding, images
from raiox_cli.search import query as search
from raiox_cli.errors import ModelMismatch
settings = config.resolve()
embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
image = images.load_image({str(query)!r})
end = time.monotonic() + {seconds}
print("ready", flush=True)
while time.monotonic() < end:
    try:
        with db.connect(settings) as conn:
            result = search.search_image(conn, embedder, image, k=2)
        print(json.dumps(["ok", result.model_id, len(result.matches)]), flush=True)
    except ModelMismatch:
        print(json.dumps(["switched"]), flush=True)
        break
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.training
def test_apply_switches_while_another_process_searches(
    trained: dict, synthetic: synth.SynthInfo, pg_server_url: str, tmp_path: Path
) -> None:
    env = {**trained["env"], "RAIOX_DATABASE_URL": _new_database(pg_server_url)}
    _ingested(env, synthetic)
    searcher = _search_loop(env, synthetic.query_files[0], seconds=120)
    assert searcher.stdout.readline().strip() == "ready"
    result = runner.invoke(app, [*trained["args"], "--apply", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["better"] is True and report["applied"] is True
    assert report["reindex"]["switched"] and report["reindex"]["model_id"] == report["model_id"]
    lines = [json.loads(line) for line in searcher.stdout]
    searcher.wait(timeout=60)
    answers = [line for line in lines if line[0] == "ok"]
    assert answers and all(a == ["ok", "raiox-tiny:none", 2] for a in answers)
    assert lines[-1] == ["switched"]  # answered until the flip, then told to switch
    search = runner.invoke(
        app,
        [
            "search",
            str(synthetic.query_files[0]),
            "--json",
            "--model",
            "raiox-tiny",
            "--weights",
            report["weights"],
        ],
        env=env,
    )
    assert search.exit_code == 0, search.output
    assert json.loads(search.stdout)["model_id"] == report["model_id"]


@pytest.mark.training
def test_after_apply_search_and_cron_follow_the_recorded_weights(
    trained: dict, synthetic: synth.SynthInfo, pg_server_url: str, tmp_path: Path
) -> None:
    """After adapt --apply, search and reindex need no RAIOX_MODEL/RAIOX_WEIGHTS: they
    follow the weights file the catalogue recorded, and refuse with the reason when it
    is changed or missing. A model chosen explicitly still wins."""
    env = {**trained["env"], "RAIOX_DATABASE_URL": _new_database(pg_server_url)}
    _ingested(env, synthetic)
    run = tmp_path / "run"  # a copy of the finished run: this test alters its weights
    shutil.copytree(trained["out"], run)
    args = [a if a != str(trained["out"]) else str(run) for a in trained["args"]]
    applied = runner.invoke(app, [*args, "--apply", "--json"], env=env)
    assert applied.exit_code == 0, applied.output
    report = json.loads(applied.stdout)
    assert report["applied"] and Path(report["weights"]).parent == run
    bare = {**env, "RAIOX_MODEL": None, "RAIOX_PRETRAINED": None}  # None: unset
    query = str(synthetic.query_files[0])
    found = runner.invoke(app, ["search", query, "--json"], env=bare)
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["model_id"] == report["model_id"]
    cron = runner.invoke(app, ["reindex", "--json"], env=bare)
    assert cron.exit_code == 0, cron.output
    assert json.loads(cron.stdout)["model_id"] == report["model_id"]
    chosen = runner.invoke(app, ["search", query], env=env)  # RAIOX_MODEL/PRETRAINED set
    assert chosen.exit_code == 5 and "differs from the catalogue's" in chosen.stderr

    weights = Path(report["weights"])
    weights.write_bytes(weights.read_bytes() + b"\0")
    changed = runner.invoke(app, ["search", query], env=bare)
    assert changed.exit_code == 4, changed.output
    assert f"loads {weights}, which changed since it was recorded" in changed.stderr
    weights.unlink()
    missing = runner.invoke(app, ["reindex"], env=bare)
    assert missing.exit_code == 4, missing.output
    assert f"loads {weights} (recorded by raiox adapt --apply" in missing.stderr
    assert "which is missing" in missing.stderr and "RAIOX_WEIGHTS" in missing.stderr


@pytest.mark.training
def test_guard_refuses_a_model_that_is_not_better(
    trained: dict, synthetic: synth.SynthInfo, pg_server_url: str, tmp_path: Path
) -> None:
    env = {**trained["env"], "RAIOX_DATABASE_URL": _new_database(pg_server_url)}
    _ingested(env, synthetic)
    args = [a if a != str(trained["out"]) else str(tmp_path / "flat") for a in trained["args"]]
    args += ["--steps", "4", "--eval-every", "2"]  # the last of a repeated option counts
    # A learning rate of ~0 leaves the model as it was: equal is not better.
    result = runner.invoke(app, [*args, "--lr", "1e-12", "--apply"], env=env)
    assert result.exit_code == 1, result.output
    assert "does not beat the catalogue's raiox-tiny:none" in result.stderr
    assert result.stderr.count("MRR") >= 2  # both sets of numbers
    with db.connect(config.resolve(env)) as conn:
        from raiox_cli.db import queries

        assert queries.active_model(conn).model_id == "raiox-tiny:none"
    forced = runner.invoke(app, [*args, "--lr", "1e-12", "--apply", "--force", "--json"], env=env)
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["applied"] is True


@pytest.fixture
def adapt_env(raiox_env: config.Settings) -> Iterator[dict[str, str]]:
    db.migrate(raiox_env)
    yield {}


@pytest.mark.training
def test_bad_input_is_one_clear_line(
    adapt_env, trained: dict, synthetic: synth.SynthInfo, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["adapt", "--steps", "2"])
    assert result.exit_code == 2
    assert "no images to train on; run raiox ingest" in result.stderr
    result = runner.invoke(app, ["adapt", "--labels", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = runner.invoke(app, ["adapt", "--train", "everything"], env=trained["env"])
    assert result.exit_code == 2 and "--train 'everything'" in result.stderr
    result = runner.invoke(app, ["adapt", "--views", "1"], env=trained["env"])
    assert result.exit_code == 2 and "--views" in result.stderr
    # --out holding another run (other data or settings) is refused, not overwritten.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model-card.json").write_text(json.dumps({"fingerprint": "another run"}))
    args = [a if a != str(trained["out"]) else str(taken) for a in trained["args"]]
    result = runner.invoke(app, args, env=trained["env"])
    assert result.exit_code == 2 and "holds another run" in result.stderr
    labels = tmp_path / "labels" / "Nobody" / "Ghost 1"
    labels.mkdir(parents=True)
    (labels / "q.png").write_bytes(synthetic.query_files[0].read_bytes())
    args = [a if a != str(trained["out"]) else str(tmp_path / "dry") for a in trained["args"]]
    result = runner.invoke(
        app, [*args, "--labels", str(tmp_path / "labels"), "--dry-run"], env=trained["env"]
    )
    assert result.exit_code == 0, result.output
    assert "label 'Nobody/Ghost 1' names no implant in the catalogue" in result.stderr


@pytest.mark.training
def test_extra_labels_train_on_designs_the_catalogue_lacks(
    trained: dict, synthetic: synth.SynthInfo, tmp_path: Path
) -> None:
    extra = tmp_path / "extra"
    for design in synth.design_systems(8, seed=5)[6:]:  # two designs not catalogued
        folder = extra / design.manufacturer / design.name
        folder.mkdir(parents=True)
        for v in range(3):
            picture = synth.render_view(design, seed=5, query=False, size=SIZE, view=v)
            (folder / f"v{v}.png").write_bytes(synth.png_bytes(picture))
    known = synthetic.implants[0]
    mine = extra / known.design.manufacturer / known.design.name
    mine.mkdir(parents=True)
    (mine / "cad.png").write_bytes(
        synth.png_bytes(synth.render_view(known.design, seed=9, query=False, size=SIZE, view=5))
    )
    (mine / "also-a-query.png").write_bytes(synthetic.query_files[0].read_bytes())
    args = [a if a != str(trained["out"]) else str(tmp_path / "x") for a in trained["args"]]
    result = runner.invoke(
        app, [*args, "--extra-labels", str(extra), "--dry-run", "--json"], env=trained["env"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    # 6 extra images of 2 new designs, plus the catalogue implant's render unless it is
    # the one held out; the copy of a validation query never trains.
    held = known.key in data["held_out_implants"]
    assert (data["extra_implants"], data["extra_images"]) == (2, 6 + (not held))
    assert data["implants"] == 6 and data["trained_implants"] == 5
    assert data["train_images"] == trained["report"]["data"]["train_images"] + 6 + (not held)
    assert "also-a-query.png: already a catalogue image or labelled X-ray" in result.stderr
    text = runner.invoke(
        app, [*args, "--extra-labels", str(extra), "--dry-run"], env=trained["env"]
    )
    assert "6 implants (5 trained, 1 held out)" in text.stdout
    assert "designs outside the catalogue, training only" in " ".join(text.stdout.split())
    missing = runner.invoke(app, [*args, "--extra-labels", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


@pytest.mark.training
def test_confirmed_xrays_in_the_database_are_training_data(
    trained: dict, synthetic: synth.SynthInfo, pg_server_url: str, tmp_path: Path
) -> None:
    env = {**trained["env"], "RAIOX_DATABASE_URL": _new_database(pg_server_url)}
    _ingested(env, synthetic)
    query, implant = synthetic.query_files[0], synthetic.implants[0]
    saved = runner.invoke(app, ["search", str(query), "--save", "--json"], env=env)
    assert saved.exit_code == 0, saved.output
    analysis_id = json.loads(saved.stdout)["analysis_id"]
    confirmed = runner.invoke(app, ["confirm", str(analysis_id), implant.key], env=env)
    assert confirmed.exit_code == 0, confirmed.output
    args = ["adapt", "--steps", "2", "--batch-size", "8", "--holdout-implants", "0", "--dry-run"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "c"), "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert (data["xrays"], data["confirmed_xrays"]) == (1, 1)
    assert data["train_images"] + data["validation_queries"]["xrays"] == 6 * 3 + 1
    result = runner.invoke(app, [*args, "--no-confirmed", "--json"], env=env)
    assert json.loads(result.stdout)["data"]["xrays"] == 0


@pytest.mark.training
def test_no_validation_queries_at_all_still_trains(
    pg_server_url: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """--holdout-implants 0, no --val-labels and implants of two images each (too few
    to spare one): nothing to validate on. The run trains every step, keeps the last
    weights and says nothing measured them (it crashed on `None > float`); --apply is
    refused, since nothing shows the model is better, unless --force."""
    info = synth.make_catalogue(
        tmp_path_factory.mktemp("two-views"), systems=4, views=2, queries=1, size=SIZE, seed=7
    )
    env = _env(_new_database(pg_server_url), tmp_path / "home")
    _ingested(env, info)
    args = ["adapt", "--holdout-implants", "0", "--steps", "4", "--batch-size", "8"]
    args += ["--eval-every", "2", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert "warning: nothing to validate on: the last weights are kept" in result.stderr
    report = json.loads(result.stdout)
    assert set(report["data"]["validation_queries"].values()) == {0}
    assert report["data"]["held_out_implants"] == []
    card = json.loads((tmp_path / "run" / "model-card.json").read_text())
    assert card["training"]["steps"] == 4 and card["training"]["best_step"] == 4
    assert card["metrics"]["after"]["all"] == {
        "n": 0, "top1": None, "top3": None, "top5": None, "mrr": None
    }  # fmt: skip
    assert Path(report["weights"]).is_file()

    refused = runner.invoke(app, [*args, "--apply"], env=env)
    assert refused.exit_code == 1, refused.output
    assert "nothing to validate on, so nothing shows the adapted model beats" in refused.stderr
    assert "Traceback" not in refused.output
    forced = runner.invoke(app, [*args, "--apply", "--force", "--json"], env=env)
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["applied"] is True
