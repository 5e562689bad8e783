"""What an adaptation run trains and how (AdaptOptions), checked (validate), and the
run's identity (fingerprint): the same command with the same data resumes the same run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raiox_cli.errors import UsageError

TRAIN_MODES = ("last", "all", "lora")
AUGMENTS = ("radiograph", "xray")  # training/augment.py's PRESETS


class NoTrainingData(UsageError):
    """Too few labelled images to train or to validate on."""


class RunMismatch(UsageError):
    """--out holds a run started with other data or settings."""


@dataclass(frozen=True)
class AdaptOptions:
    """What a run trains and how. Everything but the last group enters the run's
    fingerprint: the same command with the same data resumes the same run."""

    train: str | None = None  # last | all | lora; None: last, or all for random weights
    blocks: int = 2  # --train last: how many of the last blocks
    lora_rank: int = 8
    epochs: int = 30
    steps: int | None = None  # overrides epochs
    batch_size: int = 64  # P implants x K views
    views: int = 4  # K
    lr: float | None = None  # None: 1e-3 from random weights or with LoRA, else 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    temperature: float = 0.1
    clip: float = 1.0
    seed: int = 0
    holdout_implants: float = 0.2  # fraction of implants never trained on
    val_images: int = 1  # held-out catalogue images per trained implant (with >= 3)
    val_xrays: float = 0.2  # fraction of the --labels X-rays held out
    eval_every: int | None = None  # steps; None: about 20 evaluations per run
    patience: int = 6  # evaluations without a better validation MRR before stopping
    labels: Path | None = None
    val_labels: Path | None = None
    extra_labels: Path | None = None  # implants outside the catalogue: training only
    confirmed: bool = True  # train on X-rays confirmed in the database too
    augment: str = "radiograph"  # augment.PRESETS: radiograph (DEFAULT) or xray
    # Not in the fingerprint: how long, where, and what to do afterwards.
    max_minutes: float | None = None
    checkpoint_every: int = 25  # steps (and after every evaluation)
    out: Path | None = None
    apply: bool = False
    force: bool = False
    dry_run: bool = False


def validate(options: AdaptOptions) -> None:
    if options.train is not None and options.train not in TRAIN_MODES:
        raise UsageError(f"--train {options.train!r} is not one of {', '.join(TRAIN_MODES)}")
    for name in ("epochs", "batch_size", "blocks", "lora_rank", "patience"):
        if getattr(options, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if options.steps is not None and options.steps < 1:
        raise UsageError("--steps must be at least 1")
    if options.views < 2:
        raise UsageError("--views must be at least 2 (an implant needs a positive pair)")
    if options.batch_size < 4:
        raise UsageError("--batch-size must be at least 4 (2 implants x 2 views)")
    if not 0 <= options.holdout_implants < 1 or not 0 <= options.val_xrays < 1:
        raise UsageError("--holdout-implants and --val-xrays are fractions in [0, 1)")
    if options.lr is not None and options.lr < 0:
        raise UsageError("--lr must not be negative")
    if options.augment not in AUGMENTS:
        raise UsageError(f"--augment {options.augment!r} is not one of {', '.join(AUGMENTS)}")
    if options.checkpoint_every < 1:
        raise UsageError("--checkpoint-every must be at least 1")
    if options.temperature <= 0:
        raise UsageError("--temperature must be positive")
    if options.max_minutes is not None and options.max_minutes <= 0:
        raise UsageError("--max-minutes must be positive")
    for path in (options.labels, options.val_labels, options.extra_labels):
        if path is not None and not path.exists():
            raise UsageError(f"{path} does not exist (--labels / --val-labels / --extra-labels)")


def fingerprint(base_id: str, snapshot: dict[str, Any], options: AdaptOptions) -> str:
    keep = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in asdict(options).items()
        if k not in {"max_minutes", "checkpoint_every", "out", "apply", "force", "dry_run"}
    }
    if keep["augment"] == "radiograph":  # the default before --augment: runs still resume
        del keep["augment"]
    if keep["extra_labels"] is None:  # nor did runs before --extra-labels change identity
        del keep["extra_labels"]
    text = json.dumps(
        {"base": base_id, "data": snapshot["sha256"], "options": keep}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Seeds:
    """Every random draw of a run comes from a generator made here, seeded by (--seed,
    purpose, step, ...): the run is reproducible on CPU and a resumed run redraws
    the same batches. The stages take these generators; none seeds one itself."""

    seed: int

    def split(self) -> np.random.Generator:
        """Which implants and images are held out for validation."""
        return np.random.default_rng([self.seed, 0])

    def batch(self, step: int) -> np.random.Generator:
        """Which implants and images a step trains on."""
        return np.random.default_rng([self.seed, 1, step])

    def view(self, step: int, slot: int, view: int) -> np.random.Generator:
        """One view's augmentation."""
        return np.random.default_rng([self.seed, 2, step, slot, view])

    def torch_step(self, step: int) -> int:
        """torch's seed for a step (dropout, if the tower has any)."""
        return self.seed * 1_000_003 + step
