"""Stage 4, evaluation: the validation splits searched against the gallery in memory,
ranked the way `raiox search` ranks (best image per implant, TTA orientations)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from raiox_cli import embedding
from raiox_cli.search import query as search
from raiox_cli.training.data import SPLITS, Data
from raiox_cli.training.model import Tower

if TYPE_CHECKING:
    from PIL import Image

DEPTH = 10  # implants ranked per query; MRR counts a label found deeper as 0 (as raiox eval)


def _orientations(picture: Image.Image, tta: bool) -> list[Image.Image]:

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


def summary(metrics: dict[str, Any]) -> str:
    parts = []
    for name in (*SPLITS, "all"):
        m = metrics.get(name) or {}
        if m.get("n"):
            parts.append(f"{name} MRR {m['mrr']:.3f} top-1 {m['top1']:.3f} (n={m['n']})")
    return ", ".join(parts) or "no validation queries"
