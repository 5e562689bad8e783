"""`raiox adapt`: fine-tune the image tower on the catalogue and confirmed X-rays.

A recipe in five stages, one function each: data (labelled images, split into
training and held-out sets), model (the trainable tower embedding.py builds),
loop (multi-positive InfoNCE over P implants x K augmented views, AdamW, warm-up
+ cosine, gradient clipping, AMP on CUDA), evaluation (the ranking search does:
best image per implant, TTA orientations) and save (an open_clip safetensors
checkpoint of the image tower that --weights loads unchanged, and a model card beside it).

Every random choice comes from generators seeded by (--seed, step, sample), so a
run is reproducible on CPU and a resumed run draws the same batches. What must
survive a kill (weights, optimiser, best model, history, time spent) is one
checkpoint file, replaced atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli import embedding, images
from raiox_cli.config import Settings
from raiox_cli.db import queries
from raiox_cli.errors import ModelMismatch, RaioxError, UsageError
from raiox_cli.files import atomic_write, sha256_of
from raiox_cli.store import objects as storage
from raiox_cli.training import augment

if TYPE_CHECKING:
    import psycopg
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model-card.json"
CARD_FORMAT = "raiox-adapt-card/1"
STATE_VERSION = 1
DEPTH = 10  # implants ranked per query; MRR counts a label found deeper as 0 (as raiox eval)
SPLITS = ("catalogue", "xrays", "unseen")
TRAIN_MODES = ("last", "all", "lora")


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
    confirmed: bool = True  # train on X-rays confirmed in the database too
    # Not in the fingerprint: how long, where, and what to do afterwards.
    max_minutes: float | None = None
    checkpoint_every: int = 25  # steps (and after every evaluation)
    out: Path | None = None
    apply: bool = False
    force: bool = False
    dry_run: bool = False


# --- data --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One labelled image: where its bytes are and what it shows."""

    key: str
    sha256: str
    kind: str  # "catalogue" or "xray"
    origin: str  # for messages: a path, or "image <id>"
    path: Path | None = None
    row: dict[str, Any] | None = None


@dataclass
class Data:
    train: dict[str, list[Item]]  # implant key -> training images
    gallery: list[Item]  # what evaluation searches: catalogue images not used as queries
    splits: dict[str, list[Item]]  # validation queries per split
    held_out: list[str]  # implant keys never trained on
    skipped: list[str] = field(default_factory=list)  # "origin: reason"
    confirmed: int = 0  # X-rays confirmed in the database (the rest came from folders)

    @property
    def train_images(self) -> int:
        return sum(len(v) for v in self.train.values())

    def snapshot(self) -> dict[str, Any]:
        """Counts and a hash of the (implant key, sha256) list: what the run saw."""
        everything = [i for items in self.train.values() for i in items]
        everything += self.gallery + [i for q in self.splits.values() for i in q]
        catalogue = {(i.key, i.sha256) for i in everything if i.kind == "catalogue"}
        xrays = {(i.key, i.sha256) for i in everything if i.kind == "xray"}
        per_implant: dict[str, int] = {}
        for key, _ in catalogue:
            per_implant[key] = per_implant.get(key, 0) + 1
        counts = sorted(per_implant.values()) or [0]
        lines = sorted(
            f"{kind}\t{k}\t{s}"
            for kind, pairs in (("c", catalogue), ("x", xrays))
            for k, s in pairs
        )
        return {
            "implants": len({i.key for i in everything}),
            "trained_implants": len(self.train),
            "held_out_implants": sorted(self.held_out),
            "catalogue_images": len(catalogue),
            "xrays": len(xrays),
            "confirmed_xrays": self.confirmed,
            "images_per_implant": {
                "min": counts[0],
                "median": float(np.median(counts)),
                "max": counts[-1],
            },
            "train_images": self.train_images,
            "gallery_images": len(self.gallery),
            "validation_queries": {name: len(q) for name, q in self.splits.items()},
            "skipped": len(self.skipped),
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        }


def catalogue_items(conn: psycopg.Connection) -> list[Item]:
    return [
        Item(
            row["key"],
            row["sha256"],
            "catalogue",
            str(Path(row["root_path"]) / row["source_path"])
            if row.get("root_path") and row.get("source_path")
            else f"image {row['id']}",
            row=row,
        )
        for row in queries.training_images(conn)
    ]


def xray_items(conn: psycopg.Connection, source: Path) -> tuple[list[Item], list[str]]:
    """Labelled X-rays from a folder in the `raiox eval` layout (or its CSV), their
    labels resolved to implant keys; unknown labels and unreadable files skipped."""
    from raiox_cli.search import evaluate

    index = evaluate._label_index(conn)
    found, skipped = [], []
    for query in evaluate.labelled_queries(source):
        key = index.get(evaluate._normalise(query.label))
        if key is None:
            skipped.append(f"{query.path}: label {query.label!r} names no implant in the catalogue")
            continue
        try:
            digest = sha256_of(query.path)
        except OSError as exc:
            skipped.append(f"{query.path}: {exc.strerror or exc}")
            continue
        found.append(Item(key, digest, "xray", str(query.path), path=query.path))
    return found, skipped


def confirmed_items(conn: psycopg.Connection) -> tuple[list[Item], list[str]]:
    """X-rays a dentist confirmed (`raiox confirm`, the feedback endpoint), read back
    from the image store; those whose implant has left the catalogue are skipped."""
    found, skipped = [], []
    for row in queries.confirmed_query_images(conn):
        origin = f"analysis {row['analysis_id']}"
        if row["implant_id"] is None:
            skipped.append(f"{origin}: confirmed implant {row['implant_key']} left the catalogue")
            continue
        stored = {"id": row["analysis_id"], "sha256": row["image_sha256"]}
        stored["storage_key"] = row["storage_key"]
        found.append(Item(row["implant_key"], row["image_sha256"], "xray", origin, row=stored))
    return found, skipped


def _unique(items: Sequence[Item]) -> list[Item]:
    seen: set[tuple[str, str]] = set()
    kept = []
    for item in items:
        if (item.key, item.sha256) not in seen:
            seen.add((item.key, item.sha256))
            kept.append(item)
    return kept


def split_data(
    catalogue: Sequence[Item],
    xrays: Sequence[Item],
    val_xrays: Sequence[Item],
    options: AdaptOptions,
    rng: np.random.Generator,
) -> Data:
    """Hold out whole implants, one catalogue image of each trained implant that has
    three or more, and a fraction of the X-rays; the rest is training data."""
    by_implant: dict[str, list[Item]] = {}
    for item in catalogue:
        by_implant.setdefault(item.key, []).append(item)
    keys = sorted(by_implant)
    candidates = [k for k in keys if len(by_implant[k]) >= 2]
    n_held = round(options.holdout_implants * len(keys))
    n_held = min(n_held, max(0, len(keys) - 2), len(candidates))
    held_out = sorted(rng.choice(candidates, size=n_held, replace=False).tolist()) if n_held else []
    held = set(held_out)

    train: dict[str, list[Item]] = {}
    gallery: list[Item] = []
    splits: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for key in keys:
        items = list(by_implant[key])
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        if key in held:
            splits["unseen"].append(items[0])
            gallery.extend(items[1:])
            continue
        n_val = options.val_images if len(items) >= 3 else 0
        splits["catalogue"].extend(items[:n_val])
        gallery.extend(items[n_val:])
        train[key] = items[n_val:]

    held_xrays = [x for x in xrays if x.key in held] + [x for x in val_xrays if x.key in held]
    if held_xrays:  # X-rays of unseen implants are the better test: they replace the views
        gallery.extend(splits["unseen"])
        splits["unseen"] = held_xrays
    seen_xrays = [x for x in xrays if x.key not in held]
    n_val = round(options.val_xrays * len(seen_xrays))
    if seen_xrays and n_val == 0 and options.val_xrays > 0 and len(seen_xrays) >= 2:
        n_val = 1
    order = rng.permutation(len(seen_xrays))
    for rank, index in enumerate(order):
        item = seen_xrays[index]
        if rank < n_val:
            splits["xrays"].append(item)
        else:
            train.setdefault(item.key, []).append(item)
    splits["xrays"].extend(x for x in val_xrays if x.key not in held)
    return Data(train, gallery, splits, held_out)


def collect_data(conn: psycopg.Connection, options: AdaptOptions, rng: np.random.Generator) -> Data:
    """Stage 1: every labelled image there is, split for training and validation."""
    catalogue = catalogue_items(conn)
    if not catalogue:
        raise NoTrainingData(
            "the catalogue has no images to train on; run raiox ingest on a catalogue first"
        )
    skipped: list[str] = []
    xrays: list[Item] = []
    val: list[Item] = []
    if options.confirmed:
        xrays, skipped = confirmed_items(conn)
    confirmed = len(xrays)
    if options.labels is not None:
        more_xrays, more = xray_items(conn, options.labels)
        xrays += more_xrays
        skipped += more
    if options.val_labels is not None:
        val, more = xray_items(conn, options.val_labels)
        skipped += more
    val = _unique(val)
    held_for_validation = {(i.key, i.sha256) for i in val}
    xrays = [i for i in _unique(xrays) if (i.key, i.sha256) not in held_for_validation]
    data = split_data(catalogue, xrays, val, options, rng)
    data.skipped = skipped
    data.confirmed = confirmed
    if len(data.train) < 2:
        raise NoTrainingData(
            f"only {len(data.train)} implant(s) left to train on: contrastive training needs "
            "at least 2 implants with images (lower --holdout-implants, or add images)"
        )
    return data


def decode(item: Item, settings: Settings, store: storage.Store, longest: int) -> Image.Image:
    """An item's pixels, grey, its shortest side at most `longest` pixels."""
    from PIL import Image

    if item.row is not None:
        from raiox_cli.catalogue.reindex import original_bytes

        data = original_bytes(item.row, settings, store)
    else:
        assert item.path is not None
        data = images.read_bytes(item.path, settings.max_bytes)
    picture = images.load_image(data, max_pixels=settings.max_pixels).image.convert("L")
    w, h = picture.size
    scale = longest / min(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        picture = picture.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return picture


def load_pixels(
    data: Data, settings: Settings, image_size: int
) -> tuple[dict[str, Image.Image], dict[str, Image.Image]]:
    """Decode every image once: (training pixels, evaluation pixels) by sha256.
    Training images are kept small (augmentation runs on them every step);
    evaluation images large enough that preprocessing sees what search sees.
    An image that cannot be read is dropped from every set and reported."""
    store = storage.open_store(settings)
    train_px: dict[str, Image.Image] = {}
    eval_px: dict[str, Image.Image] = {}
    bad: set[str] = set()

    def get(item: Item, target: dict[str, Image.Image], longest: int) -> None:
        if item.sha256 in target or item.sha256 in bad:
            return
        try:
            target[item.sha256] = decode(item, settings, store, longest)
        except RaioxError as exc:
            bad.add(item.sha256)
            data.skipped.append(f"{item.origin}: {exc}")

    for items in data.train.values():
        for item in items:
            get(item, train_px, round(image_size * 1.25))
    for item in data.gallery + [i for q in data.splits.values() for i in q]:
        get(item, eval_px, image_size * 2)
    if bad:
        data.train = {
            k: kept
            for k, v in data.train.items()
            if (kept := [i for i in v if i.sha256 not in bad])
        }
        data.gallery = [i for i in data.gallery if i.sha256 not in bad]
        data.splits = {n: [i for i in q if i.sha256 not in bad] for n, q in data.splits.items()}
    return train_px, eval_px


# --- model --------------------------------------------------------------------------


@dataclass
class Tower:
    """The model being trained: the loaded open_clip model (through embedding.py),
    which of its modules train, and their parameters."""

    embedder: embedding.Embedder
    mode: str
    trainable: list[Any]  # modules put in train mode
    params: list[Any]
    lora: bool = False

    @property
    def visual(self) -> Any:
        return self.embedder.model.visual

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def train_mode(self) -> None:
        self.visual.eval()  # frozen parts keep their normalisation statistics
        for module in self.trainable:
            module.train()

    def eval_mode(self) -> None:
        self.embedder.model.eval()


def blocks_of(visual: Any) -> list[Any]:
    """The image tower's blocks in order, input to output, for --train last."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        tail = [m for m in (getattr(visual, "ln_post", None),) if m is not None]
        return [*visual.transformer.resblocks, *tail]
    if hasattr(visual, "layer4"):  # open_clip's ModifiedResNet
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4, visual.attnpool]
    raise UsageError(
        f"--train last does not know the blocks of {type(visual).__name__}; use --train all"
    )


class LoRA:
    """A low-rank update W + B A (alpha / r) registered as a parametrization, so code
    that reads `.weight` directly (nn.MultiheadAttention does) sees it too. Merged
    into the plain weight before saving."""

    @staticmethod
    def add(module: Any, name: str, rank: int) -> list[Any]:
        import torch
        from torch import nn
        from torch.nn.utils import parametrize

        weight = getattr(module, name)
        out_features, in_features = weight.shape

        class Update(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
                self.b = nn.Parameter(torch.zeros(out_features, rank))

            def forward(self, w: torch.Tensor) -> torch.Tensor:
                return w + (self.b @ self.a).to(w.dtype)

        update = Update().to(weight.device)
        parametrize.register_parametrization(module, name, update)
        return [update.a, update.b]

    @staticmethod
    def merge(model: Any) -> None:
        from torch.nn.utils import parametrize

        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def build_tower(spec: embedding.ModelSpec, options: AdaptOptions, seed: int) -> Tower:
    """Stage 2: load the model to train and choose what trains."""
    import torch
    from torch import nn

    embedder = embedding.load_trainable(spec)
    model = embedder.model
    mode = options.train or ("all" if spec.random else "last")
    for p in model.parameters():
        p.requires_grad_(False)
    visual = model.visual
    if mode == "all":
        trainable: list[Any] = [visual]
    elif mode == "last":
        blocks = blocks_of(visual)
        trainable = blocks[-max(1, options.blocks) :]
    else:
        torch.manual_seed(seed)
        trainable, params = [], []
        for module in visual.modules():
            if isinstance(module, nn.Linear):
                params += LoRA.add(module, "weight", options.lora_rank)
            elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                params += LoRA.add(module, "in_proj_weight", options.lora_rank)
        if not params:
            raise UsageError(f"{spec.name} has no linear layers for LoRA; use --train all")
        return Tower(embedder, mode, [], params, lora=True)
    params = []
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):  # a ViT's output projection follows ln_post
        proj.requires_grad_(True)
        if all(p is not proj for p in params):
            params.append(proj)
    return Tower(embedder, mode, trainable, params)


# --- loop ---------------------------------------------------------------------------


def multi_positive_infonce(
    z: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss: each view against every other view in the batch,
    all views of the same implant positive (Khosla et al. 2020, L_out). z is unit-norm."""
    import torch

    logits = (z @ z.T).float() / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits.log_softmax(dim=1).masked_fill(self_mask, 0.0)
    counts = positive.sum(dim=1)
    has = counts > 0
    per_view = -(log_prob * positive).sum(dim=1)[has] / counts[has]
    return per_view.mean()


def sample_batch(
    data: Data, options: AdaptOptions, step: int
) -> list[tuple[str, Item, np.random.Generator]]:
    """P implants x K views for one step: (implant, image, its augmentation rng),
    all drawn from generators seeded by (seed, step)."""
    rng = np.random.default_rng([options.seed, 1, step])
    keys = sorted(data.train)
    k = max(2, min(options.views, options.batch_size // 2))
    p = max(2, options.batch_size // k)
    chosen = rng.choice(len(keys), size=p, replace=p > len(keys))
    batch = []
    for slot, index in enumerate(chosen):
        items = data.train[keys[index]]
        for view in range(k):
            item = items[int(rng.integers(len(items)))]
            batch.append(
                (keys[index], item, np.random.default_rng([options.seed, 2, step, slot, view]))
            )
    return batch


def make_batch(
    tower: Tower,
    pixels: dict[str, Image.Image],
    batch: list[tuple[str, Item, np.random.Generator]],
    pool: ThreadPoolExecutor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented, preprocessed views and their integer labels."""
    import torch

    def one(entry: tuple[str, Item, np.random.Generator]) -> torch.Tensor:
        _, item, rng = entry
        return tower.embedder.preprocess(augment.augment(pixels[item.sha256], rng))

    tensors = list(pool.map(one, batch))
    names = {key: i for i, key in enumerate(sorted({key for key, _, _ in batch}))}
    labels = torch.tensor([names[key] for key, _, _ in batch])
    return torch.stack(tensors), labels


def schedule(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine to zero."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


@dataclass
class Status:
    """What the progress bar shows after each step."""

    step: int
    total: int
    loss: float
    val_mrr: float | None
    elapsed_s: float
    phase: str = "train"


@dataclass
class RunState:
    """Everything a resumed run needs, saved together."""

    fingerprint: str
    step: int = 0
    train_s: float = 0.0
    cpu_s: float = 0.0
    resumed: int = 0
    best_mrr: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    stopped: str | None = None
    before: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    last_loss: float | None = None


def save_state(
    path: Path, state: RunState, tower: Tower, optimizer: Any, best: dict[str, Any] | None
) -> None:
    """One file, written beside its final name and renamed over it: a kill leaves
    either the previous checkpoint or this one, never half of one."""
    import torch

    payload = {
        "version": STATE_VERSION,
        "state": asdict(state),
        "model": tower.embedder.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best": best,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_state(path: Path) -> dict[str, Any] | None:
    import torch

    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling errors come in many classes
        log.warning("%s is unreadable (%s); training starts over", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("version") != STATE_VERSION:
        return None
    return payload


def plan_steps(data: Data, options: AdaptOptions) -> int:
    if options.steps is not None:
        return max(1, options.steps)
    per_epoch = max(1, math.ceil(data.train_images / options.batch_size))
    return max(1, options.epochs * per_epoch)


def learning_rate(options: AdaptOptions, tower: Tower) -> float:
    """--lr, or: 1e-3 from random weights or for LoRA adapters, 1e-4 fine-tuning."""
    if options.lr is not None:
        return options.lr
    return 1e-3 if tower.embedder.spec.random or tower.lora else 1e-4


def eval_interval(total: int, options: AdaptOptions) -> int:
    return options.eval_every or max(1, total // 20)


def train(
    tower: Tower,
    data: Data,
    train_px: dict[str, Image.Image],
    eval_px: dict[str, Image.Image],
    options: AdaptOptions,
    state: RunState,
    saved: dict[str, Any] | None,
    out: Path,
    *,
    tta: bool,
    workers: int,
    progress: Callable[[Status], None] | None = None,
) -> dict[str, Any]:
    """Stage 3: the loop. Returns the best weights (visual state) seen by validation."""
    import torch

    device = tower.embedder.device
    cuda = device.startswith("cuda")
    total = plan_steps(data, options)
    every = eval_interval(total, options)
    lr = learning_rate(options, tower)
    optimizer = torch.optim.AdamW(tower.params, lr=lr, weight_decay=options.weight_decay)
    best = None
    if saved is not None:
        tower.embedder.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best = saved["best"]
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp == torch.float16)
    deadline = options.max_minutes * 60 if options.max_minutes is not None else None
    state_path = out / STATE_FILE

    def evaluate_now() -> None:
        nonlocal best
        metrics = evaluate_tower(tower, data, eval_px, tta=tta)
        mrr = metrics["all"]["mrr"]
        state.history.append(
            {
                "step": state.step,
                "minutes": round(state.train_s / 60, 3),
                "cpu_s": round(state.cpu_s, 1),
                "loss": state.last_loss,
                "metrics": metrics,
            }
        )
        if mrr > state.best_mrr or best is None:
            state.best_mrr, state.best_step, state.bad_evals = mrr, state.step, 0
            best = {k: v.detach().cpu().clone() for k, v in tower.visual.state_dict().items()}
        else:
            state.bad_evals += 1
        save_state(state_path, state, tower, optimizer, best)

    # One thread assembles the next batch while the model trains on this one; the
    # pool augments its images. Two executors: a batch task waiting on image tasks
    # in its own pool could starve it.
    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as ahead:
        upcoming: Future | None = None
        while state.stopped is None:
            if state.step >= total:
                state.stopped = "completed"
                break
            if deadline is not None and state.train_s >= deadline:
                state.stopped = "max-minutes"
                break
            if state.bad_evals >= options.patience:
                state.stopped = "early-stopping"
                break
            started, cpu_started = time.perf_counter(), time.process_time()
            step = state.step
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule(step, total, options.warmup)
            current = upcoming or ahead.submit(
                make_batch, tower, train_px, sample_batch(data, options, step), pool
            )
            pixels, labels = current.result()
            upcoming = (
                ahead.submit(
                    make_batch, tower, train_px, sample_batch(data, options, step + 1), pool
                )
                if step + 1 < total
                else None
            )
            torch.manual_seed(options.seed * 1_000_003 + step)  # dropout, if any
            tower.train_mode()
            pixels = pixels.to(device, non_blocking=cuda)
            labels = labels.to(device, non_blocking=cuda)
            with torch.autocast("cuda", dtype=amp, enabled=cuda):
                features = tower.visual(pixels)
            z = torch.nn.functional.normalize(features.float(), dim=-1)
            loss = multi_positive_infonce(z, labels, options.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(tower.params, options.clip)
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            state.last_loss = round(float(loss.detach()), 4)
            state.train_s += time.perf_counter() - started
            state.cpu_s += time.process_time() - cpu_started
            if state.step % every == 0 or state.step == total:
                evaluated = time.perf_counter(), time.process_time()
                evaluate_now()
                state.train_s += time.perf_counter() - evaluated[0]
                state.cpu_s += time.process_time() - evaluated[1]
            elif state.step % max(1, options.checkpoint_every) == 0:
                save_state(state_path, state, tower, optimizer, best)
            if progress:
                progress(
                    Status(state.step, total, state.last_loss, _last_mrr(state), state.train_s)
                )
        if upcoming is not None:
            upcoming.cancel()
    if state.history and state.history[-1]["step"] != state.step:
        evaluate_now()  # stopped between evaluations: the last weights get their chance
    save_state(state_path, state, tower, optimizer, best)
    return best if best is not None else tower.visual.state_dict()


def _last_mrr(state: RunState) -> float | None:
    return state.history[-1]["metrics"]["all"]["mrr"] if state.history else None


# --- evaluation ---------------------------------------------------------------------


def _orientations(picture: Image.Image, tta: bool) -> list[Image.Image]:
    from raiox_cli.search import query as search

    return search.oriented(picture, tta)[0]


def embed_pictures(embedder: embedding.Embedder, pictures: Sequence[Image.Image]) -> np.ndarray:
    return embedder.embed_images(list(pictures), batch_size=64)


def rank_metrics(
    query_vectors: np.ndarray,  # (Q, orientations, D)
    query_labels: Sequence[int],
    gallery_vectors: np.ndarray,  # (G, D)
    gallery_labels: np.ndarray,  # (G,)
    implants: int,
) -> dict[str, float]:
    """top-1/3/5 and MRR of the ranking search gives: each implant scored by its best
    image, each query by its best orientation."""
    if len(query_labels) == 0:
        return {"n": 0, "top1": None, "top3": None, "top5": None, "mrr": None}
    sims = np.einsum("qod,gd->qog", query_vectors, gallery_vectors).max(axis=1)
    per_implant = np.full((len(query_labels), implants), -np.inf, dtype=np.float32)
    for j in range(implants):
        members = gallery_labels == j
        if members.any():
            per_implant[:, j] = sims[:, members].max(axis=1)
    labels = np.asarray(query_labels)
    own = per_implant[np.arange(len(labels)), labels]
    ranks = (per_implant > own[:, None]).sum(axis=1) + 1
    ranks = np.where(np.isfinite(own), ranks, implants + 1)
    return {
        "n": len(labels),
        "top1": float(np.mean(ranks <= 1)),
        "top3": float(np.mean(ranks <= 3)),
        "top5": float(np.mean(ranks <= 5)),
        "mrr": float(np.mean(np.where(ranks <= DEPTH, 1.0 / ranks, 0.0))),
    }


def evaluate_embedder(
    embedder: embedding.Embedder, data: Data, eval_px: dict[str, Image.Image], *, tta: bool
) -> dict[str, dict[str, float]]:
    """Stage 4: the validation splits (and all of them pooled) searched against the
    gallery, in memory, the way `raiox search` ranks."""
    keys = sorted({i.key for i in data.gallery} | {i.key for q in data.splits.values() for i in q})
    index = {k: n for n, k in enumerate(keys)}
    gallery = embed_pictures(embedder, [eval_px[i.sha256] for i in data.gallery])
    gallery_labels = np.array([index[i.key] for i in data.gallery])
    n_orient = len(_orientations(next(iter(eval_px.values())), tta)) if eval_px else 1
    results: dict[str, dict[str, float]] = {}
    pooled_v, pooled_l = [], []
    for name in SPLITS:
        items = data.splits.get(name, [])
        pictures = [o for i in items for o in _orientations(eval_px[i.sha256], tta)]
        vectors = embed_pictures(embedder, pictures) if pictures else np.zeros((0, embedder.dim))
        vectors = vectors.reshape(len(items), n_orient, embedder.dim)
        labels = [index[i.key] for i in items]
        results[name] = rank_metrics(vectors, labels, gallery, gallery_labels, len(keys))
        pooled_v.append(vectors)
        pooled_l += labels
    results["all"] = rank_metrics(
        np.concatenate(pooled_v), pooled_l, gallery, gallery_labels, len(keys)
    )
    return results


def evaluate_tower(
    tower: Tower, data: Data, eval_px: dict[str, Image.Image], *, tta: bool
) -> dict[str, dict[str, float]]:
    tower.eval_mode()
    try:
        return evaluate_embedder(tower.embedder, data, eval_px, tta=tta)
    finally:
        tower.train_mode()


# --- save ---------------------------------------------------------------------------


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

    from raiox_cli import __version__

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


# --- the command --------------------------------------------------------------------


@dataclass
class AdaptReport:
    out: str
    base_model_id: str
    model_id: str | None = None
    weights: str | None = None
    card: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    dry_run: bool = False
    estimate_s: float | None = None
    planned_steps: int = 0
    resumed_from: int = 0
    current_model_id: str | None = None
    current: dict[str, Any] | None = None
    better: bool | None = None
    applied: bool = False
    refused: str | None = None
    reindex: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.refused is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(base_id: str, snapshot: dict[str, Any], options: AdaptOptions) -> str:
    keep = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in asdict(options).items()
        if k not in {"max_minutes", "checkpoint_every", "out", "apply", "force", "dry_run"}
    }
    text = json.dumps(
        {"base": base_id, "data": snapshot["sha256"], "options": keep}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def default_out(settings: Settings, fp: str) -> Path:
    return settings.home / "adapt" / fp[:12]


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
    if options.checkpoint_every < 1:
        raise UsageError("--checkpoint-every must be at least 1")
    if options.temperature <= 0:
        raise UsageError("--temperature must be positive")
    if options.max_minutes is not None and options.max_minutes <= 0:
        raise UsageError("--max-minutes must be positive")
    for path in (options.labels, options.val_labels):
        if path is not None and not path.exists():
            raise UsageError(f"{path} does not exist (--labels / --val-labels)")


def adapt(
    settings: Settings,
    options: AdaptOptions,
    *,
    progress: Callable[[Status], None] | None = None,
) -> AdaptReport:
    """Train, or resume training, and write the checkpoint and model card; with
    --apply, switch the catalogue to the new model when it validates better."""
    from raiox_cli import db

    validate(options)
    spec = embedding.ModelSpec.from_settings(settings)
    base_id = embedding.model_id(spec)
    rng = np.random.default_rng([options.seed, 0])
    with db.connect(settings) as conn:
        db.check_schema(conn)
        data = collect_data(conn, options, rng)
        active = queries.active_model(conn)
    snapshot = data.snapshot()
    fp = fingerprint(base_id, snapshot, options)
    out = options.out or default_out(settings, fp)
    report = AdaptReport(str(out), base_id, data=snapshot, skipped=data.skipped)
    saved = _check_out(out, fp)
    finished = _finished_card(out, fp)
    if finished is not None and not options.dry_run:
        report.card, report.model_id = finished, finished["model_id"]
        report.weights = str(out / WEIGHTS_FILE)
        report.planned_steps = finished["training"]["planned_steps"]
        report.resumed_from = finished["training"]["steps"]
        return _compare_and_apply(settings, options, report, active, data, None)

    tower = build_tower(spec, options, options.seed)
    train_px, eval_px = load_pixels(data, settings, tower.image_size)
    report.data = data.snapshot()
    report.skipped = data.skipped
    total = plan_steps(data, options)
    report.planned_steps = total
    if options.dry_run:
        report.dry_run = True
        report.estimate_s = estimate_seconds(tower, data, train_px, eval_px, options, settings)
        return report

    state = RunState(**saved["state"]) if saved is not None else RunState(fp)
    if saved is not None:
        state.resumed += 1
        state.stopped = None if state.stopped == "max-minutes" else state.stopped
        report.resumed_from = state.step
    if state.before is None:
        state.before = evaluate_tower(tower, data, eval_px, tta=settings.tta)
    clock = time.perf_counter()
    best = train(
        tower,
        data,
        train_px,
        eval_px,
        options,
        state,
        saved,
        out,
        tta=settings.tta,
        workers=_workers(settings),
        progress=progress,
    )
    weights = out / WEIGHTS_FILE
    save_weights(tower, best, weights)
    after = next(h["metrics"] for h in state.history if h["step"] == state.best_step)
    model_id = embedding.model_id(
        embedding.ModelSpec(spec.name, spec.pretrained, weights, settings.device)
    )
    card = {
        "format": CARD_FORMAT,
        "fingerprint": fp,
        "model_id": model_id,
        "architecture": spec.name,
        "weights": WEIGHTS_FILE,
        "weights_sha256": sha256_of(weights),
        "base_model_id": base_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": report.data,
        "hyperparameters": _hyperparameters(options, tower, total),
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
            "command_wall_s": round(time.perf_counter() - clock, 1),
        },
        "device": device_name(tower.embedder.device),
        "tta": settings.tta,
        "versions": library_versions(),
    }
    atomic_write(out / CARD_FILE, lambda fh: fh.write(json.dumps(card, indent=2).encode()))
    with contextlib.suppress(OSError):
        (out / STATE_FILE).unlink()  # finished: the card and the weights are the run now
    report.card, report.model_id, report.weights = card, model_id, str(weights)
    return _compare_and_apply(settings, options, report, active, data, eval_px)


def _check_out(out: Path, fp: str) -> dict[str, Any] | None:
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


def _finished_card(out: Path, fp: str) -> dict[str, Any] | None:
    try:
        card = json.loads((out / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if card.get("fingerprint") != fp or not (out / WEIGHTS_FILE).is_file():
        return None
    return card


def _hyperparameters(options: AdaptOptions, tower: Tower, total: int) -> dict[str, Any]:
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


def _workers(settings: Settings) -> int:
    return settings.workers or os.cpu_count() or 1


def estimate_seconds(
    tower: Tower,
    data: Data,
    train_px: dict[str, Image.Image],
    eval_px: dict[str, Image.Image],
    options: AdaptOptions,
    settings: Settings,
) -> float:
    """Time two forward+backward passes and one evaluation (no weight changes) and
    extrapolate to the planned steps and evaluations."""
    import torch

    total = plan_steps(data, options)
    device = tower.embedder.device
    with ThreadPoolExecutor(_workers(settings)) as pool:
        timings = []
        for step in range(2):
            started = time.perf_counter()
            pixels, labels = make_batch(tower, train_px, sample_batch(data, options, step), pool)
            tower.train_mode()
            features = tower.visual(pixels.to(device))
            z = torch.nn.functional.normalize(features.float(), dim=-1)
            multi_positive_infonce(z, labels.to(device), options.temperature).backward()
            timings.append(time.perf_counter() - started)
    for p in tower.params:
        p.grad = None
    started = time.perf_counter()
    evaluate_tower(tower, data, eval_px, tta=settings.tta)
    evaluation = time.perf_counter() - started
    evaluations = total // eval_interval(total, options) + 2
    estimate = timings[-1] * total + evaluation * evaluations
    if options.max_minutes is not None:
        estimate = min(estimate, options.max_minutes * 60 + evaluation)
    return estimate


def _current_spec(
    settings: Settings, active: queries.ModelRow, base: embedding.ModelSpec
) -> embedding.ModelSpec:
    if embedding.model_id(base) == active.model_id:
        return base
    name, _, tag = active.model_id.partition(":")
    if tag.startswith("file:"):
        raise ModelMismatch(
            f"the catalogue's model {active.model_id} was loaded from a local file; to compare "
            f"against it, train from it (RAIOX_MODEL={name} RAIOX_WEIGHTS=that file) or pass "
            "--force to apply without the comparison"
        )
    return embedding.ModelSpec(name, tag, None, settings.device)


def _compare_and_apply(
    settings: Settings,
    options: AdaptOptions,
    report: AdaptReport,
    active: queries.ModelRow | None,
    data: Data,
    eval_px: dict[str, Image.Image] | None,
) -> AdaptReport:
    """--apply: the new model must beat the catalogue's current model on the same
    validation splits (pooled MRR), unless --force."""
    if not options.apply or report.card is None:
        return report
    card = report.card
    after = card["metrics"]["after"]
    if active is None:
        current = None
    elif active.model_id == card["base_model_id"]:
        current = card["metrics"]["before"]
    elif active.model_id == report.model_id:
        report.current_model_id = active.model_id  # already the catalogue's model
        return report
    elif options.force:
        current = None
    else:
        base = embedding.ModelSpec.from_settings(settings)
        embedder = embedding.load_embedder(_current_spec(settings, active, base))
        if eval_px is None:
            _, eval_px = load_pixels(data, settings, embedder_image_size(embedder))
        current = evaluate_embedder(embedder, data, eval_px, tta=settings.tta)
    report.current_model_id = active.model_id if active else None
    report.current = current
    if current is not None:
        report.better = (after["all"]["mrr"] or 0) > (current["all"]["mrr"] or 0)
    if current is not None and not report.better and not options.force:
        report.refused = (
            f"the adapted model does not beat the catalogue's {active.model_id} on the "
            f"validation splits: {_summary(after)} vs {_summary(current)}; not applied "
            "(--force applies it anyway)"
        )
        return report
    from raiox_cli.catalogue import reindex

    target = settings.replace(
        model=card["architecture"], weights=Path(report.weights or ""), pretrained="file"
    )
    result = reindex.reindex(target, switch=True)
    report.reindex = result.to_dict()
    report.applied = result.switched
    if not result.ok:
        report.refused = "; ".join(f"{f.path}: {f.reason}" for f in result.failed)
    return report


def embedder_image_size(embedder: embedding.Embedder) -> int:
    size = embedder.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _summary(metrics: dict[str, Any]) -> str:
    parts = []
    for name in (*SPLITS, "all"):
        m = metrics.get(name) or {}
        if m.get("n"):
            parts.append(f"{name} MRR {m['mrr']:.3f} top-1 {m['top1']:.3f} (n={m['n']})")
    return ", ".join(parts) or "no validation queries"


__all__ = [
    "AdaptOptions",
    "AdaptReport",
    "Data",
    "Item",
    "NoTrainingData",
    "RunMismatch",
    "Status",
    "adapt",
    "build_tower",
    "collect_data",
    "evaluate_embedder",
    "multi_positive_infonce",
    "rank_metrics",
    "split_data",
]
