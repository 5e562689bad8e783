"""The torch path builds the image tower alone and loads it from a mapped file:
the same embeddings as open_clip's own whole-model path, no text tower in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raiox_cli import embedding
from raiox_cli.errors import ModelUnavailable

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    noisy = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    gradient = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (80, 1))
    return [noisy, Image.fromarray(gradient).convert("RGB"), noisy.convert("L").convert("RGB")]


def _trained_like(name: str, seed: int) -> torch.nn.Module:
    """A whole open_clip model with weights no initialiser would give."""
    embedding.register_bundled_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _write(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _normal_path(name: str, checkpoint: Path, images: list[Image.Image]) -> np.ndarray:
    """open_clip's documented way: create_model_and_transforms(pretrained=file)."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    model.eval()
    with torch.inference_mode():
        batch = torch.stack([preprocess(image) for image in images])
        return torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy()


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("raiox-tiny", "file.safetensors"),
        ("raiox-tiny", "file.pt"),
        ("raiox-tiny", "wrapped.pt"),  # {"state_dict": {"module.visual...": ...}}
        ("raiox-tiny", "fp16.safetensors"),
        ("raiox-small", "file.safetensors"),  # a ModifiedResNet tower, with BatchNorm buffers
    ],
)
def test_fast_path_embeds_exactly_as_open_clips_whole_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, layout: str
) -> None:
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    state = _trained_like(name, seed=11).state_dict()
    if layout.startswith("fp16"):
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if layout.startswith("wrapped"):
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    checkpoint = _write(state, tmp_path / layout)
    images = _images()
    expected = _normal_path(name, checkpoint, images)
    spec = embedding.ModelSpec(name, "laion2b_s34b_b79k", checkpoint, "cpu")
    loaded = embedding.load_trainable(spec)
    got = loaded.embed_images(images)
    assert float(np.abs(got - expected).max()) == 0.0
    # Not the seeded random model: the checkpoint's weights are in use.
    random = embedding.load_embedder(embedding.ModelSpec(name, "none", None, "cpu"))
    assert float(np.abs(random.embed_images(images) - got).max()) > 1e-3


def test_only_the_image_tower_is_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    whole = _trained_like("raiox-tiny", seed=5)
    checkpoint = _write(whole.state_dict(), tmp_path / "w.safetensors")
    for spec in (
        embedding.ModelSpec("raiox-tiny", "x", checkpoint, "cpu"),
        embedding.ModelSpec("raiox-tiny", "none", None, "cpu"),
    ):
        model = embedding.load_trainable(spec).model
        names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]]
        assert names and all(n.startswith("visual.") for n in names)
        assert not [n for n in names if "token_embedding" in n or n.startswith("transformer.")]
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        visual_count = sum(p.numel() for p in whole.visual.parameters())
        assert sum(p.numel() for p in model.parameters()) == visual_count
        assert visual_count < sum(p.numel() for p in whole.parameters())


@pytest.mark.parametrize("name", ["raiox-tiny", "raiox-small"])
def test_random_weights_are_todays(name: str) -> None:
    """Catalogues built with --pretrained none stay searchable: the image tower alone,
    built under raiox's seed, has the weights the whole model had."""
    embedding.register_bundled_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(embedding.RANDOM_SEED)
        whole = open_clip.create_model(name)
    ours = embedding.load_trainable(embedding.ModelSpec(name, "none", None, "cpu")).model
    theirs = {f"visual.{k}": v for k, v in whole.visual.state_dict().items()}
    mine = ours.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


def test_a_visual_only_checkpoint_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What raiox adapt writes (the tower's state dict, keys visual.*) loads back."""
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    whole = _trained_like("raiox-tiny", seed=8)
    full = _write(whole.state_dict(), tmp_path / "full.safetensors")
    visual = {k: v for k, v in whole.state_dict().items() if k.startswith("visual.")}
    only = _write(visual, tmp_path / "visual.safetensors")
    a = embedding.load_trainable(embedding.ModelSpec("raiox-tiny", "x", full, "cpu"))
    b = embedding.load_trainable(embedding.ModelSpec("raiox-tiny", "x", only, "cpu"))
    assert float(np.abs(a.embed_images(_images()) - b.embed_images(_images())).max()) == 0.0


def _refusal(tmp_path: Path, state: dict, name: str = "raiox-tiny") -> str:
    checkpoint = _write(state, tmp_path / "other.safetensors")
    with pytest.raises(ModelUnavailable) as info:
        embedding.load_trainable(embedding.ModelSpec(name, "x", checkpoint, "cpu"))
    return str(info.value)


def test_another_architectures_checkpoint_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    other = _trained_like("raiox-tiny48", seed=1).state_dict()  # 48-d, not 32-d
    message = _refusal(tmp_path, other)
    assert "not a checkpoint of raiox-tiny" in message and "RAIOX_MODEL" in message
    assert "wrong shape: text_projection" in message
    visual = {k: v for k, v in other.items() if k.startswith("visual.")}
    assert "wrong shape: visual.proj" in _refusal(tmp_path, visual)
    message = _refusal(tmp_path, _trained_like("raiox-small", seed=1).state_dict())
    assert "not a checkpoint of raiox-tiny" in message and "missing" in message


def test_a_matching_image_tower_with_a_foreign_text_tower_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip's strict whole-model load refuses it; so does the tower-only path,
    though it never builds the text tower."""
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    state = _trained_like("raiox-tiny", seed=2).state_dict()
    state["token_embedding.weight"] = torch.zeros(100, 32)
    message = _refusal(tmp_path, state)
    assert "wrong shape: token_embedding.weight" in message
    state = _trained_like("raiox-tiny", seed=2).state_dict()
    state["transformer.resblocks.9.ln_1.weight"] = torch.zeros(32)
    assert "unexpected: transformer.resblocks.9.ln_1.weight" in _refusal(tmp_path, state)


def test_files_that_are_not_checkpoints_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelUnavailable, match="could not read the checkpoint"):
        embedding.load_trainable(embedding.ModelSpec("raiox-tiny", "x", garbage, "cpu"))
    message = _refusal(tmp_path, {"encoder.weight": torch.zeros(3)})
    assert "no visual.* weights" in message


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_overwriting_the_checkpoint_in_place_does_not_crash_a_loaded_model(
    tmp_path: Path, suffix: str
) -> None:
    """Weights left mapped to the file would die with SIGBUS here (a server running
    while an operator copies a new checkpoint onto the old path)."""
    checkpoint = _write(_trained_like("raiox-tiny", seed=4).state_dict(), tmp_path / f"w{suffix}")
    code = (
        "import sys; from pathlib import Path; from PIL import Image;"
        "from raiox_cli import embedding as e;"
        "m = e.load_embedder(e.ModelSpec('raiox-tiny', 'x', Path(sys.argv[1]), 'cpu'));"
        "img = Image.new('RGB', (80, 80), (100, 20, 30)); a = m.embed_images([img]);"
        "open(sys.argv[1], 'r+b').truncate(64);"
        "b = m.embed_images([img]); print(float(abs(a - b).max()))"
    )
    env = {**os.environ, "RAIOX_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == 0.0


@pytest.mark.slow
def test_a_timm_image_tower_loads_like_open_clips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip's timm-backed towers (TimmModel) take the same path."""
    pytest.importorskip("timm")
    monkeypatch.setenv("RAIOX_HOME", str(tmp_path / "home"))
    configs = tmp_path / "configs"
    configs.mkdir()
    vision = {
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,  # open_clip's TimmModel keeps timm's own input size
    }
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (configs / "raiox-test-timm.json").write_text(
        json.dumps({"embed_dim": 32, "vision_cfg": vision, "text_cfg": text})
    )
    open_clip.add_model_config(configs)
    checkpoint = _write(
        _trained_like("raiox-test-timm", seed=6).state_dict(), tmp_path / "timm.safetensors"
    )
    images = _images()
    expected = _normal_path("raiox-test-timm", checkpoint, images)
    spec = embedding.ModelSpec("raiox-test-timm", "x", checkpoint, "cpu")
    got = embedding.load_trainable(spec).embed_images(images)
    assert float(np.abs(got - expected).max()) == 0.0


def test_the_cli_refuses_another_architectures_weights_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from raiox_cli.cli import app

    checkpoint = _write(
        _trained_like("raiox-tiny48", seed=1).state_dict(), tmp_path / "tiny48.safetensors"
    )
    image = tmp_path / "x.png"
    _images()[0].save(image)
    for key, value in {
        "RAIOX_HOME": str(tmp_path / "home"),
        "RAIOX_MODEL": "raiox-tiny",
        "RAIOX_WEIGHTS": str(checkpoint),
        "RAIOX_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["embed", str(image)])
    assert result.exit_code == 4
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "is not a checkpoint of raiox-tiny" in lines[0] and "RAIOX_MODEL" in lines[0]
