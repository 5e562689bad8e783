"""How good a probability and an open-set score are, measured on queries with a known
answer: expected calibration error (and the floor its own sampling noise sets), the
reliability diagram's bins, Brier score, AUROC and the false-positive rate at a
true-positive rate. Pure numpy; search/calibrate.py and `raiox eval` report them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15


def ece(probabilities: Sequence[float], correct: Sequence[int], bins: int = ECE_BINS) -> float:
    """Expected calibration error: the sample-weighted gap between mean probability
    and accuracy in equal-width probability bins."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if not len(p):
        return float("nan")
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.sum() * abs(p[mask].mean() - y[mask].mean())
    return float(total / len(p))


def ece_floor(probabilities: Sequence[float], bins: int = ECE_BINS, draws: int = 200) -> float:
    """The ECE a perfectly calibrated probability would still show at these values and
    this many queries (each outcome drawn with its own probability; seeded): the
    estimator's own noise, below which a measured ECE means nothing."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if not len(p):
        return float("nan")
    rng = np.random.default_rng(0)
    return float(np.mean([ece(p, rng.random(len(p)) < p, bins) for _ in range(draws)]))


def reliability(
    probabilities: Sequence[float], correct: Sequence[int], bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """Per bin: its range, how many, mean probability, accuracy (the diagram's bars)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    found = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        found.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "n": n,
                "probability": float(p[mask].mean()) if n else None,
                "accuracy": float(y[mask].mean()) if n else None,
            }
        )
    return found


def brier(probabilities: Sequence[float], correct: Sequence[int]) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """Area under the ROC curve: the chance a positive scores above a negative
    (ties count half), by ranks."""
    if not len(positive) or not len(negative):
        return None
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))  # ties share their average rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def fpr_at_tpr(
    positive: Sequence[float], negative: Sequence[float], tpr: float = 0.95
) -> float | None:
    """False-positive rate at the threshold that catches `tpr` of the positives."""
    if not len(positive) or not len(negative):
        return None
    threshold = np.quantile(np.asarray(positive, dtype=np.float64), 1 - tpr, method="lower")
    return float(np.mean(np.asarray(negative, dtype=np.float64) >= threshold))
