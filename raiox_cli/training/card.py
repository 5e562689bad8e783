"""Stage 5, save: the best weights as an open_clip safetensors checkpoint that --weights
loads unchanged, and the model card beside it (what was trained on what, how, and
how it scored)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from raiox_cli import __version__
from raiox_cli.files import atomic_write, sha256_of
from raiox_cli.training.loop import STATE_FILE, RunState, learning_rate, load_state
from raiox_cli.training.model import LoRA, Tower
from raiox_cli.training.options import AdaptOptions, RunMismatch

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model-card.json"
CARD_FORMAT = "raiox-adapt-card/1"


def save_weights(tower: Tower, best_visual: dict[str, Any], path: Path) -> None:
    """Stage 5: the best weights, LoRA merged, as the image tower's open_clip state
    dict (keys visual.*: embedding.py never loads a text tower) in safetensors:
    --weights loads it like any checkpoint."""
    from safetensors.torch import save

    model = tower.embedder.model
    model.visual.load_state_dict(best_visual)
    if tower.lora:
        LoRA.merge(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt", "producer": "raiox adapt"})
    atomic_write(path, lambda fh: fh.write(blob))


def library_versions() -> dict[str, str]:
    import open_clip
    import PIL
    import torch

    return {
        "raiox": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(0)})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def check_out(out: Path, fp: str) -> dict[str, Any] | None:
    """The run's saved state, if any. Never resume or overwrite a run of other data
    or settings."""
    fingerprints = []
    with contextlib.suppress(OSError, ValueError):
        fingerprints.append(json.loads((out / CARD_FILE).read_text()).get("fingerprint"))
    saved = load_state(out / STATE_FILE)
    if saved is not None:
        fingerprints.append(saved["state"]["fingerprint"])
    if any(f != fp for f in fingerprints):
        raise RunMismatch(
            f"{out} holds another run (other data or settings); choose another --out or "
            "delete that folder"
        )
    return saved


def finished_card(out: Path, fp: str) -> dict[str, Any] | None:
    try:
        card = json.loads((out / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if card.get("fingerprint") != fp or not (out / WEIGHTS_FILE).is_file():
        return None
    return card


def hyperparameters(options: AdaptOptions, tower: Tower, total: int) -> dict[str, Any]:
    chosen = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in asdict(options).items()
        if k not in {"out", "apply", "force", "dry_run", "seed"}
    }
    chosen["train"] = tower.mode
    chosen["lr"] = learning_rate(options, tower)
    chosen["image_size"] = tower.image_size
    chosen["planned_steps"] = total
    chosen["trainable_parameters"] = int(sum(p.numel() for p in tower.params))
    chosen["loss"] = "multi-positive InfoNCE (supervised contrastive)"
    chosen["optimizer"] = "AdamW, linear warm-up + cosine, grad-norm clip"
    return chosen


def model_card(
    *,
    fp: str,
    model_id: str,
    base_id: str,
    architecture: str,
    weights: Path,
    data: dict[str, Any] | None,
    options: AdaptOptions,
    tower: Tower,
    state: RunState,
    total: int,
    command_s: float,
    tta: bool,
) -> dict[str, Any]:
    """What was trained, from what, on which data, how, and how it scored before and after."""
    after = next(h["metrics"] for h in state.history if h["step"] == state.best_step)
    return {
        "format": CARD_FORMAT,
        "fingerprint": fp,
        "model_id": model_id,
        "architecture": architecture,
        "weights": WEIGHTS_FILE,
        "weights_sha256": sha256_of(weights),
        "base_model_id": base_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": data,
        "hyperparameters": hyperparameters(options, tower, total),
        "seed": options.seed,
        "metrics": {"before": state.before, "after": after},
        "history": state.history,
        "training": {
            "steps": state.step,
            "planned_steps": total,
            "best_step": state.best_step,
            "stopped": state.stopped,
            "resumed": state.resumed,
            "wall_s": round(state.train_s, 1),
            "cpu_s": round(state.cpu_s, 1),
            "command_wall_s": round(command_s, 1),
        },
        "device": device_name(tower.embedder.device),
        "tta": tta,
        "versions": library_versions(),
    }


def write_card(path: Path, card: dict[str, Any]) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(card, indent=2).encode()))
