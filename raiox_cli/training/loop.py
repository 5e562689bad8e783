"""Stage 3, the loop: multi-positive InfoNCE over P implants x K augmented views, AdamW,
warm-up + cosine, gradient clipping, AMP on CUDA.

Every batch is drawn from generators seeded by (--seed, step, sample), so a resumed
run draws the same batches; what must survive a kill is one checkpoint file,
replaced atomically."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli.config import Settings
from raiox_cli.files import atomic_write
from raiox_cli.training import augment
from raiox_cli.training.data import Data, Item
from raiox_cli.training.metrics import evaluate_tower
from raiox_cli.training.model import Tower
from raiox_cli.training.options import AdaptOptions, Seeds

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_VERSION = 1


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
    data: Data, options: AdaptOptions, step: int, seeds: Seeds
) -> list[tuple[str, Item, np.random.Generator]]:
    """P implants x K views for one step: (implant, image, its augmentation rng),
    all drawn from the run's generators for this step."""
    rng = seeds.batch(step)
    keys = sorted(data.train)
    k = max(2, min(options.views, options.batch_size // 2))
    p = max(2, options.batch_size // k)
    chosen = rng.choice(len(keys), size=p, replace=p > len(keys))
    batch = []
    for slot, index in enumerate(chosen):
        items = data.train[keys[index]]
        for view in range(k):
            item = items[int(rng.integers(len(items)))]
            batch.append((keys[index], item, seeds.view(step, slot, view)))
    return batch


def make_batch(
    tower: Tower,
    pixels: dict[str, Image.Image],
    batch: list[tuple[str, Item, np.random.Generator]],
    pool: ThreadPoolExecutor,
    preset: augment.Augmentation = augment.DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented (`preset`), preprocessed views and their integer labels."""
    import torch

    def one(entry: tuple[str, Item, np.random.Generator]) -> torch.Tensor:
        _, item, rng = entry
        return tower.embedder.preprocess(augment.augment(pixels[item.sha256], rng, preset))

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


def forward_loss(
    tower: Tower, pixels: torch.Tensor, labels: torch.Tensor, temperature: float, amp: Any = None
) -> torch.Tensor:
    """The batch's loss through the trainable tower (mixed precision with `amp`, on CUDA)."""
    import torch

    with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        features = tower.visual(pixels)
    z = torch.nn.functional.normalize(features.float(), dim=-1)
    return multi_positive_infonce(z, labels, temperature)


def stop_reason(state: RunState, total: int, options: AdaptOptions) -> str | None:
    """Why the loop stops before the next step, if it does."""
    if state.step >= total:
        return "completed"
    if options.max_minutes is not None and state.train_s >= options.max_minutes * 60:
        return "max-minutes"
    if state.bad_evals >= options.patience:
        return "early-stopping"
    return None


def evaluate_step(
    tower: Tower,
    data: Data,
    eval_px: dict[str, Image.Image],
    state: RunState,
    best: dict[str, Any] | None,
    *,
    tta: bool,
) -> dict[str, Any] | None:
    """Validate now and record it in the history; returns the best weights so far
    (these weights when they beat every earlier evaluation)."""
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
    if mrr is None:
        # Nothing to validate on (no held-out implant, catalogue view or X-ray): no
        # score can prefer earlier weights, so the latest are kept and patience holds.
        state.best_step, state.bad_evals = state.step, 0
        return {k: v.detach().cpu().clone() for k, v in tower.visual.state_dict().items()}
    if mrr > state.best_mrr or best is None:
        state.best_mrr, state.best_step, state.bad_evals = mrr, state.step, 0
        return {k: v.detach().cpu().clone() for k, v in tower.visual.state_dict().items()}
    state.bad_evals += 1
    return best


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
    seeds: Seeds,
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
    state_path = out / STATE_FILE

    def batch_of(step: int) -> Future:
        return ahead.submit(
            make_batch,
            tower,
            train_px,
            sample_batch(data, options, step, seeds),
            pool,
            augment.PRESETS[options.augment],
        )

    # One thread assembles the next batch while the model trains on this one; the
    # pool augments its images. Two executors: a batch task waiting on image tasks
    # in its own pool could starve it.
    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as ahead:
        upcoming: Future | None = None
        while state.stopped is None:
            state.stopped = stop_reason(state, total, options)
            if state.stopped is not None:
                break
            started, cpu_started = time.perf_counter(), time.process_time()
            step = state.step
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule(step, total, options.warmup)
            pixels, labels = (upcoming or batch_of(step)).result()
            upcoming = batch_of(step + 1) if step + 1 < total else None
            torch.manual_seed(seeds.torch_step(step))  # dropout, if any
            tower.train_mode()
            pixels = pixels.to(device, non_blocking=cuda)
            labels = labels.to(device, non_blocking=cuda)
            loss = forward_loss(tower, pixels, labels, options.temperature, amp if cuda else None)
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
                best = evaluate_step(tower, data, eval_px, state, best, tta=tta)
                save_state(state_path, state, tower, optimizer, best)
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
        # stopped between evaluations: the last weights get their chance
        best = evaluate_step(tower, data, eval_px, state, best, tta=tta)
        save_state(state_path, state, tower, optimizer, best)
    save_state(state_path, state, tower, optimizer, best)
    return best if best is not None else tower.visual.state_dict()


def _last_mrr(state: RunState) -> float | None:
    return state.history[-1]["metrics"]["all"]["mrr"] if state.history else None


def workers(settings: Settings) -> int:
    return settings.workers or os.cpu_count() or 1


def estimate_seconds(
    tower: Tower,
    data: Data,
    train_px: dict[str, Image.Image],
    eval_px: dict[str, Image.Image],
    options: AdaptOptions,
    settings: Settings,
    seeds: Seeds,
) -> float:
    """Time two forward+backward passes and one evaluation (no weight changes) and
    extrapolate to the planned steps and evaluations."""

    total = plan_steps(data, options)
    device = tower.embedder.device
    with ThreadPoolExecutor(workers(settings)) as pool:
        timings = []
        for step in range(2):
            started = time.perf_counter()
            batch = sample_batch(data, options, step, seeds)
            pixels, labels = make_batch(
                tower, train_px, batch, pool, augment.PRESETS[options.augment]
            )
            tower.train_mode()
            loss = forward_loss(tower, pixels.to(device), labels.to(device), options.temperature)
            loss.backward()
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
